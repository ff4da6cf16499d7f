"""apply_vidtome / remove_vidtome: VidToMe temporal merging for diffusers UNets (SD 1.x / 2.x).

Same style as apply_tome: the self-attention (attn1) processor that is set is wrapped, the
latent size and timestep come from a forward pre-hook on the UNet, nothing else is changed.
Every UNet call is one chunk of F frames times S CFG samples (batch S*F, sample-major). The
caller (our video pipeline) says S and the chunk's frame indices through `vidtome_state(pipe)`;
without that, S is 2 for an even batch (a CFG batch) and 1 otherwise, and the frames are 0..F-1.
The global token set of every block is kept on the model's device and reset whenever the step
(the timestep, or the step key the caller sets) changes.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch

from ..core import ChunkDraw, VidToMeOptions, chunk_draw, merges_level, temporal_attention
from .patch import _denoiser, _Patch, _transformer_blocks
from .processors import MergedAttnProcessor
from .state import timestep_key

PATCH_ATTR = "_tomesd_ext_vidtome"


class VidToMeState:
    """Runtime state of one patched UNet: the current call's chunk and the global token sets."""

    def __init__(self, opts: VidToMeOptions):
        self.opts = opts
        self.latent_hw: Optional[Tuple[int, int]] = None
        self.n_samples: Optional[int] = None  # set by the caller; None = auto
        self.frames: Optional[Tuple[int, ...]] = None  # frame indices of the next call
        self.step: Optional[object] = None  # explicit step key; None = the timestep
        self.enabled = True
        self.draw: Optional[ChunkDraw] = None
        self.call_samples = 1
        self.globals: Dict[int, torch.Tensor] = {}
        self._globals_step = None
        self.merged_calls: Dict[int, int] = {}  # tokens per frame -> attention calls merged

    def set_chunk(self, frames: Sequence[int], n_samples: int, step=None) -> None:
        """Declare the next UNet call: its frames (indices in the video) and CFG samples S."""
        self.frames = tuple(int(f) for f in frames)
        self.n_samples = int(n_samples)
        if step is not None:
            self.step = step

    def reset(self) -> None:
        """Forget the global token sets and the caller's declarations (e.g. between videos)."""
        self.globals.clear()
        self._globals_step = None
        self.frames = self.n_samples = self.step = None
        self.draw = None

    def begin_call(self, batch: int, timestep) -> None:
        step = self.step if self.step is not None else timestep_key(timestep)
        if step != self._globals_step:
            self.globals.clear()
            self._globals_step = step
        samples = self.n_samples if self.n_samples is not None else (2 if batch % 2 == 0 else 1)
        if batch % samples:
            raise ValueError(f"VidToMe: UNet batch {batch} is not a multiple of the declared CFG samples {samples}")
        n_frames = batch // samples
        frames = self.frames if self.frames is not None and len(self.frames) == n_frames else tuple(range(n_frames))
        self.call_samples = samples
        self.draw = chunk_draw(self.opts.seed, step, frames, self.opts.global_rand)


class VidToMeAttnProcessor(MergedAttnProcessor):
    """Wraps the attn1 processor `inner` of one block; merges across the frames of a call.

    Reuses MergedAttnProcessor's wrapping (the inner processor's call signature is exposed so
    diffusers passes the same keyword arguments) with VidToMe's merge instead of ToMe's.
    """

    def __init__(self, inner, state: VidToMeState, block_id: int):
        super().__init__(inner, slot=None, self_attention=True)
        self.state = state
        self.block_id = block_id

    def _level_ok(self, n_tokens: int) -> bool:
        return merges_level(n_tokens, self.state.latent_hw, self.state.opts.max_downsample)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        st = self.state
        if (
            not st.enabled
            or st.draw is None
            or hidden_states.ndim != 3
            or encoder_hidden_states is not None
            or attention_mask is not None
            or not self._level_ok(hidden_states.shape[1])
        ):
            return self.inner(
                attn, hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask, **kwargs
            )

        def run(tokens):
            return self.inner(attn, tokens, encoder_hidden_states=None, attention_mask=None, **kwargs)

        out, new_global = temporal_attention(
            hidden_states, st.call_samples, run, st.opts, st.draw, st.globals.get(self.block_id)
        )
        if new_global is not None:
            st.globals[self.block_id] = new_global
        n = hidden_states.shape[1]
        st.merged_calls[n] = st.merged_calls.get(n, 0) + 1
        return out

    def __repr__(self):
        return f"VidToMeAttnProcessor({self.inner!r})"


class _VidToMePatch(_Patch):
    """What apply_vidtome changed (hooks, wrapped attn1 processors); remove() undoes exactly that."""

    def __init__(self, model, opts: VidToMeOptions):
        self.model = model
        self.opts = opts
        self.state = VidToMeState(opts)
        self.handles = []
        self.wrapped = []  # (attention module, wrapper, inner processor), restored by _Patch.remove

    def install(self):
        self.handles.append(self.model.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
        for i, block in enumerate(_transformer_blocks(self.model)):
            attn = getattr(block, "attn1", None)
            if attn is None or block.only_cross_attention:
                continue
            inner = attn.processor
            wrapper = VidToMeAttnProcessor(inner, self.state, i)
            object.__setattr__(attn, "processor", wrapper)
            self.wrapped.append((attn, wrapper, inner))
        if not self.wrapped:
            raise TypeError(f"{type(self.model).__name__} has no self-attention blocks to merge")

    def remove(self):
        super().remove()
        self.state.reset()

    def _pre_hook(self, module, args, kwargs):
        sample = args[0] if args else kwargs.get("sample")
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        if sample is None:
            return
        self.state.latent_hw = tuple(sample.shape[-2:])
        self.state.begin_call(sample.shape[0], timestep)


def apply_vidtome(
    pipe_or_model,
    chunk_size: int = 4,
    local_ratio: float = 0.9,
    global_ratio: float = 0.8,
    max_downsample: int = 2,
    seed: Optional[int] = None,
    *,
    global_rand: float = 0.5,
    align_batch: bool = True,
):
    """Patch a pipeline's UNet (or a UNet) in place with VidToMe merging; returns the argument.

    Every UNet call is treated as one chunk of frames (see VidToMeOptions for the options and
    their ranges). Applying again replaces the earlier settings; ControlNets are not patched.
    """
    opts = VidToMeOptions.create(
        chunk_size=chunk_size,
        local_ratio=local_ratio,
        global_ratio=global_ratio,
        max_downsample=max_downsample,
        seed=seed,
        global_rand=global_rand,
        align_batch=align_batch,
    )
    model = _denoiser(pipe_or_model)
    remove_vidtome(model)
    patch = _VidToMePatch(model, opts)
    patch.install()
    object.__setattr__(model, PATCH_ATTR, patch)
    return pipe_or_model


def remove_vidtome(pipe_or_model):
    """Undo apply_vidtome (a no-op on an unpatched model); returns the argument."""
    model = _denoiser(pipe_or_model)
    patch = model.__dict__.pop(PATCH_ATTR, None)
    if patch is not None:
        patch.remove()
    return pipe_or_model


def vidtome_state(pipe_or_model) -> Optional[VidToMeState]:
    """The VidToMeState of a patched model (to declare chunks), or None when not patched."""
    patch = _denoiser(pipe_or_model).__dict__.get(PATCH_ATTR)
    return patch.state if patch is not None else None

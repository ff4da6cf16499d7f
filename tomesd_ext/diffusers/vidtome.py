"""apply_vidtome / remove_vidtome: VidToMe temporal merging for diffusers UNets (SD 1.x / 2.x).

Every UNet call is one chunk of F frames times S CFG samples (batch S*F, sample-major). The
chunks of a step come from the core: ``vidtome_state(pipe).run_step(n_frames, S, step, call)``
runs ``call(frames)`` for each chunk of ``core.step_schedule`` in order (the video pipeline does
this), so the chunk borders, order and draws are the ones the ComfyUI adapter uses. A UNet call
outside ``run_step`` is one chunk of frames 0..F-1 (S = 2 for an even batch, else 1) keyed by
its timestep. The self-attention (attn1) processors are wrapped; the global token set of every
block is carried from chunk to chunk and dropped when the step changes.
"""

from __future__ import annotations

from functools import partial
from typing import Optional

from ..core import MergeRuntime, VidToMeOptions, VidToMePolicy, timestep_key
from .discovery import self_attentions
from .patching import ModelPatch, building, install_patch, installed_patch, uninstall_patch
from .processors import VidToMeAttnProcessor

PATCH_ATTR = "_tomesd_ext_vidtome"


class _VidToMePatch(ModelPatch):
    def remove(self) -> None:
        super().remove()
        self.policy.reset()


class _ChunkCall:
    """Per denoiser call: the policy's chunk of this call (its draw, CFG samples and step)."""

    def __init__(self, policy: VidToMePolicy):
        self.policy = policy

    def __call__(self, sample, timestep):
        self.policy.begin_call(sample.shape[0], timestep_key(timestep))


def _attach(patch: ModelPatch) -> None:
    patch.track_calls(before=_ChunkCall(patch.policy))
    for i, attn in self_attentions(patch.model):
        patch.wrap(attn, partial(VidToMeAttnProcessor, runtime=patch.runtime, block_id=i))
    if not patch.wrapped:
        raise TypeError(f"{type(patch.model).__name__} has no self-attention blocks to merge")


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

    Options and ranges: docs/video.md (``tomesd_ext.core.VIDTOME_OPTIONS``). Applying again
    replaces the earlier settings; ControlNets are not patched.
    """
    opts = VidToMeOptions.create(
        chunk_size=chunk_size, local_ratio=local_ratio, global_ratio=global_ratio,
        max_downsample=max_downsample, seed=seed, global_rand=global_rand, align_batch=align_batch,
    )

    def build(model):
        runtime = MergeRuntime(VidToMePolicy(opts), opts.max_downsample)
        return building(_VidToMePatch(model, runtime), _attach)

    return install_patch(pipe_or_model, PATCH_ATTR, build)


def remove_vidtome(pipe_or_model):
    """Undo apply_vidtome (a no-op on an unpatched model); returns the argument."""
    return uninstall_patch(pipe_or_model, PATCH_ATTR)


def vidtome_state(pipe_or_model) -> Optional[VidToMePolicy]:
    """The VidToMePolicy of a patched model (its ``run_step`` runs a step's chunks), or None."""
    patch = installed_patch(pipe_or_model, PATCH_ATTR)
    return patch.policy if patch is not None else None

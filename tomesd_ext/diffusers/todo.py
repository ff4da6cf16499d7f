"""apply_todo / remove_todo: ToDo-style K/V downsampling on a diffusers UNet (Smith et al., ToDo, arXiv 2402.13573).

Wraps the self-attention processor of every transformer block: at levels d <= max_downsample
the keys and values come from the token grid downsampled by `factor` per axis (nearest), the
queries stay whole (Smith et al., arXiv 2402.13573). The latent size comes from a forward
pre-hook on the denoiser, as in apply_tome. Reversible; applying again replaces the settings.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

from ..core import ToDoOptions, downsample_tokens, level_grid
from .patch import _transformer_blocks, install_patch, resolve_max_downsample, restore_processors, uninstall_patch, wrap_processor
from .processors import expose_signature

TODO_ATTR = "_tomesd_ext_todo"


class _ToDoState:
    def __init__(self, opts: ToDoOptions, max_downsample: int):
        self.opts = opts
        self.max_downsample = max_downsample
        self.latent_hw: Optional[Tuple[int, int]] = None

    def grid(self, n_tokens: int):
        """(h, w) of a level that is downsampled, else None."""
        if self.latent_hw is None or self.opts.factor == 1:
            return None
        found = level_grid(n_tokens, self.latent_hw)
        if found is None or found[0] > self.max_downsample:
            return None
        return found[1], found[2]


class ToDoAttnProcessor:
    """Wraps `inner`: self-attention with K/V from downsample_tokens(x) (B, N/f^2, C), Q from x."""

    def __init__(self, inner, state: _ToDoState):
        self.inner = inner
        self.state = state
        expose_signature(self, inner)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        grid = None
        if hidden_states.ndim == 3 and encoder_hidden_states is None and attention_mask is None:
            grid = self.state.grid(hidden_states.shape[1])
        if grid is None:
            return self.inner(
                attn, hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask, **kwargs
            )
        kv = downsample_tokens(hidden_states, grid[0], grid[1], self.state.opts.factor, self.state.opts.mode)
        return self.inner(attn, hidden_states, encoder_hidden_states=kv, **kwargs)

    def __repr__(self):
        return f"ToDoAttnProcessor({self.inner!r})"


class _ToDoPatch:
    def __init__(self, model, opts: ToDoOptions):
        self.model = model
        self.opts = opts
        self.state = _ToDoState(opts, resolve_max_downsample(model, opts.max_downsample))
        self.handles = []
        self.wrapped = []

    def install(self):
        self.handles.append(self.model.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
        for block in _transformer_blocks(self.model):
            attn = getattr(block, "attn1", None)
            if attn is None or block.only_cross_attention:
                continue
            wrap_processor(attn, ToDoAttnProcessor(attn.processor, self.state), self.wrapped)

    def _pre_hook(self, module, args, kwargs):
        sample = args[0] if args else kwargs.get("sample")
        self.state.latent_hw = tuple(sample.shape[-2:]) if sample is not None else None

    def remove(self):
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        restore_processors(self.wrapped)


def apply_todo(pipe_or_model, factor: int = 2, *, max_downsample: Union[int, str] = "auto", mode: str = "nearest"):
    """Patch a pipeline's UNet (or a UNet) in place with ToDo K/V downsampling; returns the argument.

    factor in [1, 8] (1 = identity); max_downsample "auto" or 1/2/4/8...; mode "nearest" or
    "nearest-exact".
    """
    opts = ToDoOptions.create(factor=factor, max_downsample=max_downsample, mode=mode)
    return install_patch(pipe_or_model, TODO_ATTR, lambda model: _ToDoPatch(model, opts))


def remove_todo(pipe_or_model):
    """Undo apply_todo (a no-op on an unpatched model); returns the argument."""
    return uninstall_patch(pipe_or_model, TODO_ATTR)

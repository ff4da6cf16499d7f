"""apply_todo / remove_todo: ToDo K/V downsampling on a diffusers UNet (Smith et al., arXiv
2402.13573): at levels d <= max_downsample the self-attention keys and values come from the token
grid downsampled by `factor` per axis, the queries stay whole. Reversible; applying again
replaces the settings."""

from __future__ import annotations

from functools import partial
from typing import Union

from ..core import MergeRuntime, ToDoOptions, ToDoPolicy
from .discovery import resolve_max_downsample, self_attentions
from .patching import ModelPatch, building, install_patch, uninstall_patch
from .processors import ToDoAttnProcessor

TODO_ATTR = "_tomesd_ext_todo"


def _attach(patch: ModelPatch) -> None:
    patch.track_calls()
    for _i, attn in self_attentions(patch.model):
        patch.wrap(attn, partial(ToDoAttnProcessor, runtime=patch.runtime))


def apply_todo(pipe_or_model, factor: int = 2, *, max_downsample: Union[int, str] = "auto", mode: str = "nearest"):
    """Patch a pipeline's UNet (or a UNet) in place with ToDo K/V downsampling; returns the argument.

    factor in [1, 8] (1 = identity); max_downsample "auto" or 1/2/4/8...; mode "nearest" or
    "nearest-exact" (``tomesd_ext.core.TODO_OPTIONS``).
    """
    opts = ToDoOptions.create(factor=factor, max_downsample=max_downsample, mode=mode)

    def build(model):
        runtime = MergeRuntime(ToDoPolicy(opts), resolve_max_downsample(model, opts.max_downsample))
        return building(ModelPatch(model, runtime), _attach)

    return install_patch(pipe_or_model, TODO_ATTR, build)


def remove_todo(pipe_or_model):
    """Undo apply_todo (a no-op on an unpatched model); returns the argument."""
    return uninstall_patch(pipe_or_model, TODO_ATTR)

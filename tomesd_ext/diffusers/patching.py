"""Patch mechanics for diffusers denoisers: what a patch adds, and how it is undone exactly.

Only diffusers' and torch's extension points are used: the attention processor that is set is
wrapped (never replaced), modules get forward hooks, and the denoiser's forward pre-hook tells the
patch's ``MergeRuntime`` the latent size and timestep of every call. Nothing of the model's
classes, forwards or weights changes, so accelerate/diffusers hooks, LoRA and offloading keep
working. A patch is stored on the denoiser under its method's attribute; applying again replaces it.
"""

from __future__ import annotations

import torch

from ..core import MergeRuntime, timestep_key
from .discovery import denoiser_of


class ModelPatch:
    """Everything one ``apply_*`` added to a denoiser (hooks, wrapped processors) around one runtime."""

    def __init__(self, model, runtime: MergeRuntime):
        self.model = model
        self.runtime = runtime
        self.handles = []
        self.wrapped = []  # (attention module, wrapper, inner processor)
        self.importance = None  # importance mode: the ImportanceHooks feeding the policy

    @property
    def opts(self):
        return self.runtime.opts

    @property
    def policy(self):
        return self.runtime.policy

    def hook(self, handle) -> None:
        self.handles.append(handle)

    def track_calls(self, *, before=None) -> None:
        """A forward pre-hook on the denoiser: ``runtime.begin_call(latent (H, W), timestep key)``,
        then ``before(sample)`` when given (a policy's own per-call step)."""

        def pre_hook(module, args, kwargs):
            sample = args[0] if args else kwargs.get("sample")
            timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
            latent_hw = tuple(sample.shape[-2:]) if sample is not None else None
            self.runtime.begin_call(latent_hw, timestep_key(timestep))
            if before is not None and sample is not None:
                before(sample, timestep)

        self.hook(self.model.register_forward_pre_hook(pre_hook, with_kwargs=True))

    def wrap(self, attn, wrapper) -> None:
        """Set ``wrapper`` (built around ``attn.processor``) on ``attn``.

        object.__setattr__ leaves an nn.Module processor (IP-Adapter) registered in _modules, so
        state_dict keys and .to() are unchanged while patched.
        """
        inner = attn.processor
        object.__setattr__(attn, "processor", wrapper)
        self.wrapped.append((attn, wrapper, inner))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        for attn, wrapper, inner in self.wrapped:
            if attn.__dict__.get("processor") is not wrapper:
                continue  # the user set another processor since; leave it
            if isinstance(inner, torch.nn.Module):
                del attn.__dict__["processor"]
            else:
                object.__setattr__(attn, "processor", inner)
        self.wrapped.clear()


def install_patch(pipe_or_model, attr: str, build):
    """Replace the patch stored under ``attr`` on the denoiser by ``build(model)`` (a ModelPatch that
    ``build`` attaches); a build that fails leaves nothing behind. Returns the argument."""
    model = denoiser_of(pipe_or_model)
    uninstall_patch(model, attr)
    patch = build(model)
    object.__setattr__(model, attr, patch)
    return pipe_or_model


def uninstall_patch(pipe_or_model, attr: str):
    """Remove the patch stored under ``attr`` (a no-op when there is none); returns the argument."""
    patch = denoiser_of(pipe_or_model).__dict__.pop(attr, None)
    if patch is not None:
        patch.remove()
    return pipe_or_model


def installed_patch(pipe_or_model, attr: str):
    """The ModelPatch stored under ``attr``, or None."""
    return denoiser_of(pipe_or_model).__dict__.get(attr)


def building(patch: ModelPatch, attach) -> ModelPatch:
    """Run ``attach(patch)``; on an error remove what it added already and re-raise."""
    try:
        attach(patch)
    except BaseException:
        patch.remove()
        raise
    return patch

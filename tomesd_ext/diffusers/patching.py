"""Patch mechanics for diffusers denoisers: what a patch adds, and how it is undone exactly.

Only diffusers' and torch's extension points are used: the attention processor that is set is
wrapped (never replaced), modules get forward hooks, and the denoiser's forward pre-hook tells the
patch's ``MergeRuntime`` the latent size and timestep of every call. Nothing of the model's
classes, forwards or weights changes, so accelerate/diffusers hooks, LoRA and offloading keep
working. A patch is stored on the denoiser under its method's attribute; applying again replaces it.

Every hook and wrapper is an object that refers to the patch's runtime, so ``copy.deepcopy`` and
``pickle`` of a patched model give an independent model that behaves like a fresh patch. A
processor set after patching (``set_attn_processor``, ``set_default_attn_processor``,
``fuse_qkv_projections``, an IP-Adapter load, attention slicing) is wrapped at the next denoiser
call, so merging stays on until the patch is removed; patches of different methods nest and come
off in any order.
"""

from __future__ import annotations

import torch

from ..core import MergeRuntime, timestep_key
from ..kernels import check_kernel_setting
from .discovery import denoiser_of
from .processors import wrapped_chain


def _step_key(sample, timestep) -> float:
    """The step key of a call: its timestep's (a module-level function: a patch stays picklable)."""
    return timestep_key(timestep)


class CallStart:
    """Forward pre-hook of the denoiser: ``runtime.begin_call(latent (H, W), timestep key)``, the
    policy's own per-call step ``before(sample, timestep)`` if any, and re-wrapping of processors
    that were swapped since the last call. A clip sample (B, C, F, H, W) of a UNet with motion
    modules also tells the runtime F, the frames per clip of the rows its spatial blocks see."""

    def __init__(self, patch: "ModelPatch", before=None, read=None):
        self.patch = patch
        self.before = before
        self.read = read or _step_key  # (sample, timestep) -> the call's step key

    @torch.compiler.disable  # per-call Python state (step key, random draws): outside a compiled graph
    def __call__(self, module, args, kwargs):
        sample = args[0] if args else kwargs.get("sample")
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        self.patch.rewrap()
        latent_hw = tuple(sample.shape[-2:]) if sample is not None else None
        clip_frames = sample.shape[2] if sample is not None and sample.ndim == 5 else 1
        key = self.read(sample, timestep)
        self.patch.runtime.begin_call(
            latent_hw, key, device=getattr(sample, "device", None), clip_frames=clip_frames,
            progress=min(max(1.0 - key / 1000.0, 0.0), 1.0),  # UNets: timesteps 999 .. 0 over sampling
        )
        if self.before is not None and sample is not None:
            self.before(sample, timestep)


class CallEnd:
    """Forward hook of the denoiser (also on an exception): ``runtime.end_call()``."""

    def __init__(self, runtime: MergeRuntime):
        self.runtime = runtime

    @torch.compiler.disable
    def __call__(self, module, args, output):
        self.runtime.end_call()


class LeaveSlot:
    """Forward hook of a merged block (``always_call``: also when the call raised): the block's
    ``BlockSlot.leave`` (forgets the per-call plan, ends a checkpoint recomputation's replay)."""

    def __init__(self, slot):
        self.slot = slot

    def __call__(self, module, args, output):
        self.slot.leave()


class ModelPatch:
    """Everything one ``apply_*`` added to a denoiser (hooks, wrapped processors) around one runtime.

    ``wrapped``: [attention module, wrapper, make] entries; ``make(processor)`` builds the wrapper
    of a processor (used again when the processor is swapped).
    """

    def __init__(self, model, runtime: MergeRuntime):
        self.model = model
        self.runtime = runtime
        self.handles = []
        self.wrapped = []
        self.importance = None  # importance mode: the ImportanceHooks feeding the policy
        self.auto = None  # ratio="auto": the AutoRatio pre-hook (diffusers/auto.py)

    @property
    def opts(self):
        return self.runtime.opts

    @property
    def policy(self):
        return self.runtime.policy

    def hook(self, handle) -> None:
        self.handles.append(handle)

    def track_calls(self, before=None, start=None, read=None) -> None:
        """The denoiser's pre-hook (``start``, default ``CallStart``) and end-of-call hook (``CallEnd``)."""
        start = start if start is not None else CallStart(self, before, read)
        self.hook(self.model.register_forward_pre_hook(start, with_kwargs=True))
        self.hook(self.model.register_forward_hook(CallEnd(self.runtime), always_call=True))

    def wrap(self, attn, make) -> None:
        """Set ``make(attn.processor)`` on ``attn``.

        object.__setattr__ leaves an nn.Module processor (IP-Adapter) registered in _modules, so
        state_dict keys and .to() are unchanged while patched.
        """
        wrapper = make(attn.processor)
        object.__setattr__(attn, "processor", wrapper)
        self.wrapped.append([attn, wrapper, make])

    def rewrap(self) -> None:
        """Wrap again every processor that was swapped since it was wrapped."""
        for entry in self.wrapped:
            attn, wrapper, make = entry
            current = attn.processor
            if current is wrapper or any(p is wrapper for p in wrapped_chain(current)):
                continue
            entry[1] = make(current)
            object.__setattr__(attn, "processor", entry[1])

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        for attn, wrapper, _make in self.wrapped:
            current = attn.processor
            if current is wrapper:
                _restore(attn, wrapper)
                continue
            for outer in wrapped_chain(current)[:-1]:  # nested in another patch's wrapper: unlink
                if outer.inner is wrapper:
                    outer.inner = wrapper.inner
                    break
        self.wrapped.clear()


def _restore(attn, wrapper) -> None:
    """Put ``wrapper.inner`` back as ``attn.processor``, where the wrapper sits: in the instance
    dict (set by us; an nn.Module processor registered under it shows through again) or in
    ``_modules`` (diffusers set the wrapper again, as a module look-alike)."""
    inner = wrapper.inner
    if attn.__dict__.get("processor") is wrapper:
        del attn.__dict__["processor"]
        if attn._modules.get("processor") is not inner:
            object.__setattr__(attn, "processor", inner)
    elif attn._modules.get("processor") is wrapper:
        if isinstance(inner, torch.nn.Module):
            attn._modules["processor"] = inner
        else:
            del attn._modules["processor"]
            object.__setattr__(attn, "processor", inner)


def check_not_patched_elsewhere(model) -> None:
    """Refuse a denoiser that another token-merging library patched (tomesd's apply_patch): its
    merged blocks would be planned as grids they are not."""
    if any(type(m).__name__.startswith("ToMe") for m in model.modules()):  # tomesd's ToMeBlock classes
        raise TypeError(
            f"{type(model).__name__} is already patched by tomesd (tomesd.apply_patch): remove that patch "
            "(tomesd.remove_patch) before applying tomesd-ext"
        )


def install_patch(pipe_or_model, attr: str, build, transformers: bool = False, motion: bool = False):
    """Replace the patch stored under ``attr`` on the denoiser by ``build(model)`` (a ModelPatch that
    ``build`` attaches); a build that fails leaves nothing behind. transformers: the method also
    patches image transformers; motion: UNets with motion modules (AnimateDiff). Returns the argument."""
    model = denoiser_of(pipe_or_model, transformers, motion)
    check_kernel_setting()  # a bad TOMESD_EXT_KERNELS fails here, not at every forward
    check_not_patched_elsewhere(model)
    uninstall_patch(model, attr)
    patch = build(model)
    object.__setattr__(model, attr, patch)
    return pipe_or_model


def uninstall_patch(pipe_or_model, attr: str):
    """Remove the patch stored under ``attr`` (a no-op when there is none); returns the argument."""
    patch = denoiser_of(pipe_or_model, motion=True).__dict__.pop(attr, None)
    if patch is not None:
        patch.remove()
    return pipe_or_model


def installed_patch(pipe_or_model, attr: str):
    """The ModelPatch stored under ``attr``, or None."""
    return denoiser_of(pipe_or_model, motion=True).__dict__.get(attr)


def building(patch: ModelPatch, attach) -> ModelPatch:
    """Run ``attach(patch)``; on an error remove what it added already and re-raise."""
    try:
        attach(patch)
    except BaseException:
        patch.remove()
        raise
    return patch

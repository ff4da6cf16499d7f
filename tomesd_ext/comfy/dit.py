"""ToMe on ComfyUI's image transformers (Flux.1/.2, SD3/SD3.5, Qwen-Image), on a clone only.

The family facts (dit_families.py) say which blocks run and where the image tokens are; the
algorithm is core/dit.py. Everything attaches through ComfyUI's extension points on the clone:

- ``ApplyModelWrapper`` (``WrappersMP.APPLY_MODEL``, run by every model, unlike the
  DIFFUSION_MODEL wrapper that MMDiT and PixArt skip): the latent (B, C, [T,] H, W) gives the
  image-token grid, ``model_sampling.timestep(sigma)`` the step key, sigma the sampling window
  and the sampling progress (the windows of per-block settings). With ratio="auto", before the
  first call in the window of each latent shape it runs the call again for the error-budget
  search (core.schedule.AutoChooser; memory cache only).
- block mode, ``BlockMerge`` in ``patches_replace["dit"][(kind, i)]``: the image span of
  ``args["img"]`` is merged (``merge_span``), ``args["pe"]`` gathered at the groups' anchors
  (``gather_span``), the original block runs on the shorter sequence and its update is unmerged
  (``unmerge_update``). Text tokens pass untouched.
- kv mode, ``KeysValuesPlan`` in the same places plus ``KeysValuesAttention`` as
  ``transformer_options["optimized_attention_override"]``: the block's plan (from its input image
  tokens) merges the keys and values of the image span of its self/joint attention after RoPE
  (``merge_keys_values``); queries and outputs keep every token. An attention whose query and key
  lengths differ (cross attention) is left alone. A foreign override is kept and called after ours.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..core import MergeRuntime, OptionError, ToMeOptions, shared_token_map, timestep_key
from ..core.schedule import AutoChooser
from ..core.dit import dit_settings, gather_span, merge_keys_values, merge_span, merged_blocks, span_plan, unmerge_update
from .dit_families import SUPPORTED_DITS, Family, family_of, token_grid
from .patching import (ATTENTION_OVERRIDE, PatchState, SharedPatch, merge_policy, patched_clone, sigma_progress, sigma_range,
                       unsupported_reason)


class DitState(PatchState):
    """PatchState of a DiT patch: the family, the patch size, and per call the text length of the
    block in progress and (kv mode) its plan."""

    def __init__(self, runtime: MergeRuntime, family: Family, patch_size: int):
        super().__init__(runtime)
        self.family, self.patch_size = family, patch_size
        self.n_txt = 0
        self.kv = None  # (plan, n_txt) while a kv-mode block runs
        self.auto: Optional[AutoChooser] = None  # ratio="auto"

    @torch.compiler.disable  # Python call state (step key, random draws): outside a compiled graph
    def begin_dit_call(self, latent: torch.Tensor, timestep, sigma, progress=None) -> None:
        grid = token_grid(tuple(latent.shape), self.patch_size) if isinstance(latent, torch.Tensor) else None
        self.runtime.begin_call(grid, timestep_key(timestep), sigma, device=getattr(latent, "device", None),
                                progress=progress)
        self.n_txt, self.kv = 0, None
        if self.on_call is not None:  # importance mode: the map of the previous step
            self.on_call(latent, {})

    def token_map(self, hmap: torch.Tensor, latent_shape) -> Optional[torch.Tensor]:
        """The mean map of a step at the token grid of its latent (B0, C, [1,] H, W) (PatchState);
        None for another latent or a patch size that is no power of 2."""
        grid = token_grid(tuple(latent_shape), self.patch_size)
        if hmap.ndim == 4 and hmap.shape[1] == 1:  # a latent of one frame (Qwen-Image)
            hmap = hmap[:, 0]
        if grid is None or hmap.ndim != 3:
            return None
        try:
            return shared_token_map(hmap, grid)
        except ValueError:
            return None

    def end_call(self) -> None:
        super().end_call()
        self.kv = None


class ApplyModelWrapper(SharedPatch):
    """wrapper(executor, x, t, c_concat, c_crossattn, control, transformer_options, **kw): x the
    latent, t its sigma; starts and ends the runtime's call around the model."""

    def __call__(self, executor, x, t, *args, **kwargs):
        sampling = executor.class_obj.model_sampling
        state = self.state
        auto = getattr(state, "auto", None)
        if auto is not None and not auto.searching and isinstance(x, torch.Tensor) and self.in_window(t):
            def forward():  # the call again, as a call of its own
                out = self(executor, x, t, *args, **kwargs)
                return out[0] if isinstance(out, (tuple, list)) else out

            auto.choose(executor.class_obj.diffusion_model, (tuple(x.shape), str(x.dtype)), forward)
        state.begin_dit_call(x, sampling.timestep(t), t, sigma_progress(sampling, t))
        try:
            return executor(x, t, *args, **kwargs)
        finally:
            self.state.end_call()


    def in_window(self, sigma) -> bool:
        rt = self.state.runtime
        s = float(sigma.flatten()[0].item()) if hasattr(sigma, "flatten") else float(sigma)
        return rt.sigma_end <= s <= rt.sigma_start


class _Block(SharedPatch):
    """A ``patches_replace["dit"]`` entry: block_fn(args, {"original_block": fn}) -> dict."""

    def __init__(self, state: DitState, slot, kind: str):
        super().__init__(state)
        self.slot, self.kind = slot, kind

    def plan(self, args) -> Tuple[Optional[object], int]:
        """(the plan of this block call or None, start of the image span in args["img"])."""
        state, rt = self.state, self.state.runtime
        self.slot.reset()
        txt = args.get("txt")
        if isinstance(txt, torch.Tensor):
            state.n_txt = txt.shape[1]
        x = args.get("img")
        if not rt.active or not isinstance(x, torch.Tensor) or x.ndim != 3 or args.get("attn_mask") is not None:
            return None, 0
        n = rt.latent_hw[0] * rt.latent_hw[1]
        start = state.n_txt if self.kind in state.family.joined else 0
        extra = x.shape[1] - start - n  # reference-image tokens after the span
        if extra < 0 or (extra and not state.family.refs):
            return None, 0
        return span_plan(self.slot, x, start), start


class BlockMerge(_Block):
    """Block mode: the original block on merged image tokens, its update unmerged."""

    def __call__(self, args, extra):
        original = extra["original_block"]
        plan, start = self.plan(args)
        if plan is None:
            return original(args)
        x = args["img"]
        merged = merge_span(x, plan, start)
        inner = dict(args, img=merged.clone())  # Flux blocks add to their input in place
        pe_dim = self.state.family.pe_dim
        if pe_dim is not None and isinstance(args.get("pe"), torch.Tensor):
            inner["pe"] = gather_span(args["pe"], plan, self.state.n_txt, pe_dim)
        out = dict(original(inner))
        out["img"] = unmerge_update(x, merged, out["img"], plan, start)
        return out


class KeysValuesPlan(_Block):
    """kv mode: the block's plan offered to ``KeysValuesAttention`` while the original block runs."""

    def __call__(self, args, extra):
        plan, _start = self.plan(args)
        self.state.kv = None if plan is None else (plan, self.state.n_txt)
        try:
            return extra["original_block"](args)
        finally:
            self.state.kv = None


_QKV = ("q", "k", "v", "heads")


class KeysValuesAttention(SharedPatch):
    """optimized_attention_override(func, q, k, v, heads, mask=None, skip_reshape=False, ...): the
    image span of self/joint attention keys and values merged by the kv plan of the block running.

    q, k, v: (B, H, L, D) with skip_reshape, else (B, L, H*D). The image span starts at 0 when the
    sequence is the image alone, after the text when it is [text, image, ...]."""

    def __init__(self, state: DitState, previous=None):
        super().__init__(state)
        self.previous = previous  # another node's override, called after ours

    def __call__(self, func, *args, **kwargs):
        a = dict(zip(_QKV, args), **kwargs)
        kv = self.state.kv
        if kv is not None and all(isinstance(a.get(name), torch.Tensor) for name in _QKV[:3]):
            a = self._merged(a, *kv) or a
        call = func if self.previous is None else (lambda *x, **kw: self.previous(func, *x, **kw))
        return call(a.pop("q"), a.pop("k"), a.pop("v"), a.pop("heads"), **a)

    @staticmethod
    def _merged(a, plan, n_txt):
        q, k, v, heads = a["q"], a["k"], a["v"], a["heads"]
        if not a.get("skip_reshape", False):
            if k.ndim != 3:
                return None
            q, k, v = (t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
        if k.ndim != 4 or q.shape[-2] != k.shape[-2]:
            return None  # cross attention
        length, n = k.shape[-2], plan.n_tokens
        start = 0 if length == n else (n_txt if length >= n_txt + n else None)
        if start is None:
            return None
        mask = a.get("mask")
        if isinstance(mask, torch.Tensor):
            while mask.ndim < 4:
                mask = mask.unsqueeze(0)
        k, v, mask = merge_keys_values(k, v, plan, start, mask)
        return dict(a, q=q, k=k, v=v, mask=mask, skip_reshape=True)


def apply_dit_patch(model, opts: ToMeOptions, start_percent: float = 0.0, end_percent: float = 1.0):
    """(patched clone, None), or (``model``, reason) when its diffusion model is no supported DiT.

    opts: validated ToMeOptions (mode "tome"; ratio, seed, min_tokens, dit_mode, skip_ends apply).
    A previous tomesd-ext patch on ``model`` is replaced."""
    m, _state, reason = dit_patch(model, opts, start_percent, end_percent)
    return m, reason


def dit_patch(model, opts: ToMeOptions, start_percent: float = 0.0, end_percent: float = 1.0):
    """(patched clone, its DitState, None), or (``model``, None, reason); see apply_dit_patch. The
    policy is ``merge_policy(opts)`` (importance mode: the caller feeds it the map)."""
    dm = getattr(getattr(model, "model", None), "diffusion_model", None)
    family = family_of(dm)
    if family is None:
        from .dit_hooks import apply_hooked_patch, hooked_family_of  # blocks without patches_replace

        hooked = hooked_family_of(dm)
        if hooked is not None:
            return (*apply_hooked_patch(model, dm, hooked, opts, start_percent, end_percent), None)
        return model, None, f"{unsupported_reason(model)}, and the transformers {SUPPORTED_DITS}"
    mode, skip = dit_settings(family.key(dm), opts.dit_mode, opts.skip_ends)
    sigma_start, sigma_end = sigma_range(model, start_percent, end_percent)
    runtime = MergeRuntime(merge_policy(opts), 1, sigma_start, sigma_end)
    runtime.cost_kind = mode  # the budget search's cost model
    state = DitState(runtime, family, int(getattr(dm, "patch_size", 2)))
    if opts.auto:
        state.auto = AutoChooser(runtime, family.key(dm))
    return install_blocks(model, state, mode, family.blocks(dm), skip, (BlockMerge, KeysValuesPlan)), state, None


def install_blocks(model, state, mode: str, order, skip: int, classes):
    """The patched clone of ``model``: the call wrapper, and on the ``patches_replace["dit"]`` keys
    ``order`` (all but ``skip`` at each end) classes[0] (block mode) or classes[1] plus the
    attention override classes[2] (kv mode; default ``KeysValuesAttention``), the block classes
    built as cls(state, slot, kind)."""
    if mode == "attn":
        raise OptionError(
            "dit_mode='attn' is not available in ComfyUI (its attention hook sees projected queries, keys and "
            "values only); use 'block' or 'kv'"
        )
    m = patched_clone(model, state, ApplyModelWrapper(state))
    block = classes[0] if mode == "block" else classes[1]
    for i in merged_blocks(len(order), skip):
        kind, index = order[i]
        m.set_model_patch_replace(block(state, state.runtime.new_slot(), kind), "dit", kind, index)
    if mode == "kv":
        to = m.model_options.setdefault("transformer_options", {})
        attention = classes[2] if len(classes) > 2 else KeysValuesAttention
        to[ATTENTION_OVERRIDE] = attention(state, to.get(ATTENTION_OVERRIDE))
    return m

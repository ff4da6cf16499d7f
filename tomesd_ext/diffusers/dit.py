"""apply_tome on diffusers' image transformers (Flux, Flux.2, SD3, Qwen-Image, Z-Image, PixArt).

The family facts (dit_families.py) say where the image tokens are; the algorithm is core/dit.py:

- block mode: a forward pre-hook on each merged block merges the image span of its token
  sequence and gathers the positional inputs (rotary tables, masks) at the groups' anchors; its
  forward hook unmerges the block's update (``unmerge_update``). Text tokens pass untouched.
- attn mode: the same pre-hook / forward hook pair on each image attention module instead of the
  block (its output is unmerged by copy: it is no residual stream).
- kv mode: the processor of each image attention is wrapped; during its call a torch function
  mode merges the keys and values of the image span at ``scaled_dot_product_attention`` (after
  rotary positions were applied), with proportional attention. Backends that do not call torch's
  SDPA (flash-attn, sage) run unmerged, said once.

The call pre-hook reads the image grid from the call (position ids, latent shape, img_shapes)
and starts the runtime's call; a call whose grid cannot be read merges nothing (said once per patch
when the family knows why: a Z-Image batch of several sizes, LTX-Video coordinates that are no raster).

Beside diffusers' caches (``enable_cache``): they wrap ``module.forward`` of blocks or attentions,
so torch hooks run outside them and a cache there sees what the hooks merged. Every step has its
own plan, so a residual or prediction of merged tokens kept by a cache would not line up with the
next step's tokens. Hence (``cache_keeps``): the first and last block of a block cache
(FirstBlockCache, MagCache: the residual it tests and the residual it replays) are not merged in
any mode, which also keeps FirstBlockCache's similarity test free of plan changes; a block whose
attention a cache keeps (TaylorSeer, PAB, FasterCache) is not merged in block or attn mode, while
kv mode merges inside the attention processor, under the cache. Blocks between the first and the
last merge as usual: on a skipped step they return their input, which unmerges to itself.
"""

from __future__ import annotations

import logging
from functools import partial

import torch
from torch.overrides import TorchFunctionMode

from ..core import ImportancePolicy, timestep_key
from ..core.dit import dit_settings, merged_video_grid, merge_keys_values, merge_span, merged_blocks, span_plan, unmerge_span, unmerge_update
from .dit_families import CallArgs, Family, bind
from .dit_importance import track_dit_importance
from .patching import LeaveSlot
from .processors import WrappedProcessor

log = logging.getLogger("tomesd_ext")


class CallState:
    """The transformer call in progress: its text length, and ``lead``, the image tokens before
    the merged span (the first latent frame when ``keep_first_frame`` holds it back)."""

    def __init__(self):
        self.n_txt = 0
        self.lead = 0


class DitCallStart:
    """Forward pre-hook of the transformer: read grid, text length and timestep; begin the call."""

    def __init__(self, patch, family: Family, state: CallState, importance=None):
        self.patch, self.family, self.state, self.importance = patch, family, state, importance

    @torch.compiler.disable  # reads Python state of the call (signature, step key): outside a compiled graph
    def __call__(self, module, args, kwargs):
        self.patch.rewrap()
        info = self.family.read(bind(module.forward, args, kwargs).arguments, module)
        grid, state = info.grid, self.state
        state.n_txt, state.lead = info.n_txt, info.lead
        if grid is not None and len(grid) == 3:
            frames_grid = grid
            grid, held = merged_video_grid(frames_grid, self.patch.opts.keep_first_frame)
            state.lead += held * frames_grid[1] * frames_grid[2]
        sample = info.sample[0] if isinstance(info.sample, (list, tuple)) and info.sample else info.sample
        device = sample.device if isinstance(sample, torch.Tensor) else None
        if self.importance is not None:  # the CFG layout and the step key in one host read
            key = self.importance.read(info.sample, info.grid, info.lead, info.timestep)
        else:
            key = timestep_key(info.timestep)
        self.patch.runtime.begin_call(grid, key, device=device, progress=sampling_progress(self.family.name, key))
        if info.reason is not None:
            say_once(self.patch.runtime, self.family, info.reason)
        if self.importance is not None:
            self.importance.before()


class BlockMerge:
    """Pre-hook of one block (block mode): merge its image span, gather its positional inputs.

    A block's call starts a new plan (``slot.enter``, which keeps or replays it for gradient
    checkpointing); the attention pre-hook subclass reuses it."""

    starts_block = True

    def __init__(self, slot, family: Family, blocks, state: CallState, block=None, inner=()):
        self.slot, self.family, self.blocks, self.state = slot, family, blocks, state
        self.hidden, self.joined = blocks.hidden, blocks.joined
        self.block, self.inner = block, inner  # the block, and the merged modules in it a cache may keep
        self.pending = None  # (x, x_merged, plan, start) between the pre- and the forward hook

    def __call__(self, module, args, kwargs):
        if self.starts_block:
            self.slot.enter(partial(block_input, module, args, kwargs, self.hidden))
        self.pending = None
        if not self.slot.runtime.active or self.cached():
            return None
        call = CallArgs(module.forward, args, kwargs)
        a = call.named
        x = a.get(self.hidden)
        start = (self.state.n_txt if self.joined else 0) + self.state.lead
        plan = span_plan(self.slot, x, start)
        if plan is None:
            return None
        rt = self.slot.runtime
        reason = self.family.positions(a, plan, self.state)
        if reason is not None:  # its positional inputs cannot follow the tokens
            say_once(rt, self.family, reason)
            return None
        merged = merge_span(x, plan, start)
        a[self.hidden] = merged
        self.pending = (x, merged, plan, start)
        return call.args_kwargs()

    def cached(self) -> bool:
        """A diffusers cache keeps tensors of the block (its first or last block) or of a merged
        module inside it (an attention cache) across steps."""
        if self.block is not None and cache_keeps(self.block):
            return True
        if any(cache_keeps(m) for m in self.inner):
            rt = self.slot.runtime
            if not getattr(rt, "_cache_said", False):
                rt._cache_said = True
                log.warning(
                    "tomesd-ext: a diffusers cache keeps outputs of modules inside merged blocks across steps (TaylorSeer, "
                    "PAB, FasterCache): dit_mode='block'/'attn' leaves those blocks unmerged; dit_mode='kv' merges under "
                    "such a cache (said once per patch)"
                )
            return True
        return False


# How a family's call timestep runs over sampling (its pipeline's convention): 1000 .. 0 (most),
# 1 .. 0 (the pipeline passes timestep / 1000) or 0 .. 1 (Z-Image passes (1000 - t) / 1000).
UNIT_TIMESTEP = ("flux", "flux2", "qwen-image")
RISING_TIMESTEP = ("z-image",)


def sampling_progress(family: str, key: float) -> float:
    """The fraction of sampling done at a call of ``family`` with timestep key ``key``."""
    if family in RISING_TIMESTEP:
        done = key
    elif family in UNIT_TIMESTEP:
        done = 1.0 - key
    else:
        done = 1.0 - key / 1000.0
    return min(max(done, 0.0), 1.0)


def say_once(runtime, family: Family, reason: str) -> None:
    """Log once per patch and reason that the family's calls with ``reason`` are not merged."""
    said = runtime.__dict__.setdefault("_reasons_said", set())
    if reason not in said:
        said.add(reason)
        log.warning("tomesd-ext: %s calls with %s are not merged (said once per patch)", family.name, reason)


def cache_keeps(module) -> bool:
    """Whether a diffusers cache hook on ``module`` keeps tensors of its calls for later steps: a
    stateful hook (FirstBlockCache/MagCache head, TaylorSeer, PAB, FasterCache), a leader (SeaCache
    head) or a tail (FirstBlockCache/MagCache/SeaCache last block). The pass-through hooks of the
    blocks between (they return their input on a skipped step) keep nothing."""
    registry = module.__dict__.get("_diffusers_hook")
    if registry is None:
        return False
    return any(
        getattr(hook, "_is_stateful", False) or getattr(hook, "is_tail", False) or "leader" in name
        for name, hook in getattr(registry, "hooks", {}).items()
    )


class AttnMerge(BlockMerge):
    """Pre-hook of one image attention (attn mode): merge the image span of its input, gather its
    positional inputs; ``AttnUnmerge`` copies each group's output back to its tokens."""

    starts_block = False

    def __init__(self, slot, family: Family, blocks, state: CallState, block=None, inner=()):
        super().__init__(slot, family, blocks, state, block, inner)
        self.hidden, self.joined = "hidden_states", blocks.attn_joined


class AttnUnmerge:
    """Forward hook of a merged attention: its (first) output back to full length."""

    def __init__(self, merge: AttnMerge):
        self.merge = merge

    def __call__(self, module, args, output):
        pending, self.merge.pending = self.merge.pending, None
        if pending is None or output is None:
            return None
        _x, _merged, plan, start = pending
        if isinstance(output, tuple):
            return (unmerge_span(output[0], plan, start),) + output[1:]
        return unmerge_span(output, plan, start)


class BlockUnmerge:
    """Forward hook of a merged block: full-length output (the last output when it returns several)."""

    def __init__(self, merge: BlockMerge):
        self.merge = merge

    def __call__(self, module, args, output):
        pending, self.merge.pending = self.merge.pending, None
        self.merge.slot.leave()
        if pending is None or output is None:  # None: the call raised (a recomputation stopped early)
            return None
        x, merged, plan, start = pending
        if isinstance(output, tuple):
            i = self.merge.blocks.out % len(output)
            return output[:i] + (unmerge_update(x, merged, output[i], plan, start),) + output[i + 1 :]
        return unmerge_update(x, merged, output, plan, start)


class _KeysValuesAtSdpa(TorchFunctionMode):
    """While active: self/joint attention through torch's SDPA gets the image span of its keys
    and values merged by ``plan`` (queries and the output keep every token)."""

    def __init__(self, plan, start):
        super().__init__()
        self.plan, self.start, self.hits = plan, start, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is not torch.nn.functional.scaled_dot_product_attention:
            return func(*args, **(kwargs or {}))
        a = dict(zip(_SDPA_ARGS, args), **(kwargs or {}))
        q, k = a.get("query"), a.get("key")
        end = self.start + self.plan.n_tokens
        if (
            k is not None and k.ndim == 4 and q.shape[-2] == k.shape[-2] >= end
            and not a.get("is_causal") and not a.get("enable_gqa")
        ):
            a["key"], a["value"], a["attn_mask"] = merge_keys_values(k, a["value"], self.plan, self.start, a.get("attn_mask"))
            self.hits += 1
        return func(**a)


_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


class KeysValuesProcessor(WrappedProcessor):
    """kv mode around one image attention: the plan from the image span of the processor's input,
    keys and values merged at SDPA (``_KeysValuesAtSdpa``)."""

    def __init__(self, inner=None, slot=None, blocks=None, family=None, state=None, block=None):
        super().__init__(inner)
        self.slot, self.blocks, self.family, self.state, self.block = slot, blocks, family, state, block

    def forward(self, attn, hidden_states, *args, **kwargs):
        state = self.state
        start = (state.n_txt if self.blocks.attn_joined else 0) + state.lead
        kept = self.block is not None and cache_keeps(self.block)  # a block cache's first or last block
        plan = span_plan(self.slot, hidden_states, start) if self.slot is not None and not kept else None
        if plan is None:
            return self.inner(attn, hidden_states, *args, **kwargs)
        mode = _KeysValuesAtSdpa(plan, (state.n_txt if self.family.text_first else 0) + state.lead)
        with mode:
            out = self.inner(attn, hidden_states, *args, **kwargs)
        rt = self.slot.runtime
        if mode.hits == 0 and not getattr(rt, "_kv_missed_said", False):
            rt._kv_missed_said = True
            log.warning(
                "tomesd-ext: dit_mode='kv' merges keys and values at torch's scaled_dot_product_attention, which this "
                "attention backend does not call, so it runs unmerged; use the default (native) attention backend or "
                "dit_mode='block' (said once per patch)"
            )
        return out


def block_input(module, args, kwargs, hidden):
    """The token sequence a block call was given (its argument ``hidden``)."""
    return CallArgs(module.forward, args, kwargs).named.get(hidden)


class BlockEnter:
    """Pre-hook of a block in attn and kv mode: its call starts a new plan (``slot.enter``)."""

    def __init__(self, slot, hidden: str):
        self.slot, self.hidden = slot, hidden

    def __call__(self, module, args, kwargs):
        self.slot.enter(partial(block_input, module, args, kwargs, self.hidden))


def attach_dit(patch, family: Family) -> None:
    """Hooks of one DiT patch: the call pre-hook, then per merged block the block hooks (block
    mode), the attention hooks (attn mode) or the wrapped image attentions (kv mode)."""
    model, runtime, opts = patch.model, patch.runtime, patch.opts
    mode, skip = dit_settings(family.name, opts.dit_mode, opts.skip_ends)
    state = CallState()
    runtime.context = state  # kept with each call's plans for checkpoint recomputations
    patch.dit_mode, patch.skip_ends = mode, skip
    runtime.cost_kind = mode  # the budget search's cost model
    importance = None
    if isinstance(runtime.policy, ImportancePolicy) and family.predicts:
        importance = patch.importance = track_dit_importance(patch)
    patch.track_calls(start=DitCallStart(patch, family, state, importance))
    order = [(spec, block) for spec in family.lists for block in getattr(model, spec.name, None) or []]
    for i in merged_blocks(len(order), skip):
        spec, block = order[i]
        slot = runtime.new_slot()
        attentions = [a for a in (getattr(block, n, None) for n in spec.attentions) if hasattr(a, "processor")]
        if mode == "block":
            merge = BlockMerge(slot, family, spec, state, block, inner=tuple(block.modules())[1:])
            patch.hook(block.register_forward_pre_hook(merge, with_kwargs=True))
            patch.hook(block.register_forward_hook(BlockUnmerge(merge), always_call=True))
        else:
            patch.hook(block.register_forward_pre_hook(BlockEnter(slot, spec.hidden), with_kwargs=True))
            patch.hook(block.register_forward_hook(LeaveSlot(slot), always_call=True))
        for attn in attentions:
            if mode != "kv":
                # A pass-through wrapper: torch.compile does not guard module hooks, but it does
                # guard the processors a compiled forward calls, so code compiled before this
                # patch (or before its removal) is recompiled instead of silently reused.
                patch.wrap(attn, WrappedProcessor)
            if mode == "block":
                continue
            if mode == "attn":
                merge = AttnMerge(slot, family, spec, state, block, inner=(attn,))
                patch.hook(attn.register_forward_pre_hook(merge, with_kwargs=True))
                patch.hook(attn.register_forward_hook(AttnUnmerge(merge), always_call=True))
            else:
                patch.wrap(attn, partial(KeysValuesProcessor, slot=slot, blocks=spec, family=family, state=state, block=block))

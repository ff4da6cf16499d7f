"""apply_tome / remove_tome (ToMe-SD and importance mode) and apply_query_merge (queries only,
ComfyUI's built-in style) on diffusers UNets: a ``MergeRuntime`` with the method's policy, the
attention processors of every transformer block wrapped, feed-forward hooks for ``merge_mlp``.
"""

from __future__ import annotations

from functools import partial
from typing import Union

from ..core import ImportancePolicy, MergeRuntime, OptionError, TomePolicy, ToMeOptions, merge, unmerge
from ..core.schedule import Schedule, model_fingerprint
from ..core.block import merge_block, unet_mode, unmerge_block
from .auto import AutoRatio, load_schedule
from .discovery import blocks_in_order, denoiser_of, resolve_max_downsample, second_denoisers
from .dit import attach_dit
from .dit_families import family_of
from .importance import track_importance
from .patching import LeaveSlot, ModelPatch, building, install_patch, installed_patch, uninstall_patch
from .processors import MergedAttnProcessor, WrappedProcessor

PATCH_ATTR = "_tomesd_ext_patch"


def _attach(patch: ModelPatch) -> None:
    """Wrap every transformer block of the denoiser for the runtime's ToMe-family policy."""
    runtime, opts = patch.runtime, patch.opts
    queries_only = getattr(runtime.policy, "queries_only", False)
    if isinstance(runtime.policy, ImportancePolicy):
        patch.importance = track_importance(patch)
    else:
        patch.track_calls()
    patch.unet_mode = "ops" if queries_only else unet_mode(opts)
    if patch.unet_mode == "block":  # the budget search's cost model
        runtime.cost_kind = "block"
    else:
        runtime.cost_kind = "attn+mlp" if opts.merge_mlp else "attn"
    for downsample, block in blocks_in_order(patch.model):
        slot = runtime.new_slot(downsample=downsample)
        if patch.unet_mode == "block":
            merge_hook = BlockMerge(slot)
            patch.hook(block.register_forward_pre_hook(merge_hook, with_kwargs=True))
            patch.hook(block.register_forward_hook(BlockUnmerge(merge_hook), always_call=True))
            for attn in (getattr(block, "attn1", None), getattr(block, "attn2", None)):
                if attn is not None:
                    # a pass-through wrapper: torch.compile guards the processors a compiled forward
                    # calls (not module hooks), so code compiled before the patch is recompiled
                    patch.wrap(attn, WrappedProcessor)
            continue
        patch.hook(block.register_forward_pre_hook(EnterSlot(slot), with_kwargs=True))
        patch.hook(block.register_forward_hook(LeaveSlot(slot), always_call=True))
        if opts.merge_attn and getattr(block, "attn1", None) is not None:
            self_attention = not block.only_cross_attention
            patch.wrap(block.attn1, partial(MergedAttnProcessor, slot=slot, self_attention=self_attention, queries_only=queries_only))
        if opts.merge_crossattn and getattr(block, "attn2", None) is not None:
            patch.wrap(block.attn2, partial(MergedAttnProcessor, slot=slot, self_attention=False, queries_only=queries_only))
        if opts.merge_mlp and getattr(block, "ff", None) is not None:
            patch.hook(block.ff.register_forward_pre_hook(MergeInput(slot), with_kwargs=True))
            patch.hook(block.ff.register_forward_hook(UnmergeOutput(slot)))


class EnterSlot:
    """Before each block call: a new plan (kept, or replayed by a gradient checkpoint's
    recomputation, under the block's hidden_states: ``BlockSlot.enter``)."""

    def __init__(self, slot):
        self.slot = slot

    def __call__(self, module, args, kwargs):
        self.slot.enter(args[0] if args else kwargs.get("hidden_states"))


class BlockMerge:
    """Forward pre-hook of a BasicTransformerBlock in block mode: a new plan (``slot.enter``), the
    block's hidden_states merged (``core.block.merge_block``); ``BlockUnmerge`` unmerges its update.
    A call with a self-attention mask runs unmerged (the mask does not follow merged tokens)."""

    def __init__(self, slot):
        self.slot = slot
        self.pending = None  # (x, merged, plan) between the pre-hook and the forward hook

    def __call__(self, module, args, kwargs):
        x = args[0] if args else kwargs.get("hidden_states")
        self.slot.enter(x)
        self.pending = None
        mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
        if mask is not None:
            return None
        chunk = getattr(module, "_chunk_size", None) if getattr(module, "_chunk_dim", 0) == 1 else None
        found = merge_block(self.slot, x, chunk)
        if found is None:
            return None
        merged, plan = found
        self.pending = (x, merged, plan)
        if args:
            return (merged,) + tuple(args[1:]), kwargs
        return args, dict(kwargs, hidden_states=merged)


class BlockUnmerge:
    """Forward hook of a block-mode block (also when the call raised): its output back to N
    tokens, each token's input plus its group's update; then ``slot.leave``."""

    def __init__(self, merge_hook: BlockMerge):
        self.merge = merge_hook

    def __call__(self, module, args, output):
        pending, self.merge.pending = self.merge.pending, None
        self.merge.slot.leave()
        if pending is None or output is None:
            return None
        x, merged, plan = pending
        if isinstance(output, tuple):
            return (unmerge_block(x, merged, output[0], plan),) + output[1:]
        return unmerge_block(x, merged, output, plan)


class MergeInput:
    """Forward pre-hook of a feed-forward: merge its input (B, N, C) -> (B, N - r, C)."""

    def __init__(self, slot):
        self.slot = slot

    def __call__(self, module, args, kwargs):
        x = args[0] if args else None
        plan = self.slot.get(x) if x is not None else None
        if plan is not None:
            self.slot.merged.add("ff")
            return (merge(args[0], plan),) + tuple(args[1:]), kwargs


class UnmergeOutput:
    """Forward hook of a feed-forward: unmerge its output back to N tokens."""

    def __init__(self, slot):
        self.slot = slot

    def __call__(self, module, args, output):
        if "ff" in self.slot.merged:
            self.slot.merged.discard("ff")
            return unmerge(output, self.slot.plan)


def _install(pipe_or_model, opts: ToMeOptions, queries_only: bool = False, schedule_cache=None):
    def build(model):
        policy = ImportancePolicy(opts) if opts.mode == "importance" else TomePolicy(opts, queries_only)
        family = family_of(model)
        if family is not None:
            patch = building(ModelPatch(model, MergeRuntime(policy, 1)), partial(attach_dit, family=family))
        else:
            runtime = MergeRuntime(policy, resolve_max_downsample(model, opts.max_downsample))
            patch = building(ModelPatch(model, runtime), _attach)
        if opts.auto:  # before the call pre-hook: the search runs ahead of the call it measures
            patch.auto = AutoRatio(patch, family.name if family is not None else "unet", schedule_cache)
            patch.hook(model.register_forward_pre_hook(patch.auto, with_kwargs=True, prepend=True))
        return patch

    return install_patch(pipe_or_model, PATCH_ATTR, build, transformers=not queries_only, motion=True)


def apply_tome(
    pipe_or_model,
    ratio: Union[float, str] = 0.5,
    *,
    max_downsample: Union[int, str] = "auto",
    sx: int = 2,
    sy: int = 2,
    use_rand: bool = True,
    seed=None,
    merge_attn: bool = True,
    merge_crossattn: bool = False,
    merge_mlp: bool = False,
    mode: str = "tome",
    pool_factor: float = 1.4,
    cfg_layout: str = "auto",
    prune_steps: int = 0,
    reuse: str = "block",
    reuse_steps: int = 1,
    min_tokens=None,
    dit_mode: str = "auto",
    unet_mode: str = "auto",
    skip_ends=None,
    st: int = 2,
    keep_first_frame: bool = False,
    frame_reach=None,
    frame_plan: str = "shared",
    block_ratios=None,
    max_error=None,
    schedule=None,
    schedule_cache=None,
):
    """Patch a diffusers pipeline's denoiser in place; returns the argument.

    Denoisers: UNet2DConditionModel / ControlNetModel (SD 1.x, 2.x, SDXL) and the image
    transformers FluxTransformer2DModel, Flux2Transformer2DModel, SD3Transformer2DModel,
    QwenImageTransformer2DModel, ZImageTransformer2DModel, PixArtTransformer2DModel (image tokens
    only; dit_mode and skip_ends apply to them, max_downsample and merge_* to UNets), Flux's
    FluxControlNetModel (passed explicitly: a pipeline's ControlNet is not patched) and the video
    transformers WanTransformer3DModel (a Wan 2.2 pipeline's transformer_2 too, or alone when its
    transformer is None), HunyuanVideoTransformer3DModel, LTXVideoTransformer3DModel (st,
    keep_first_frame, frame_reach).
    AnimateDiff's UNetMotionModel (and the AnimateDiff pipelines holding one): the spatial
    self-attention of every frame is merged, the motion modules' temporal attention is not;
    frame_plan "shared" gives all frames of a clip one plan, "per-frame" plans each frame.
    UNets: unet_mode "block" runs each spatial transformer block whole on merged tokens and
    unmerges its update (core/block.py); "ops" merges around the operators merge_* name.

    mode="importance" draws destinations from the tokens with the largest CFG difference of the
    previous step (docs/importance.md; pool_factor, cfg_layout, prune_steps apply to it only).
    Per-block settings (docs/schedules.md): block_ratios sets one ratio (and sampling window) per
    group of blocks; ratio="auto" with max_error chooses them at the first call of each input
    shape (extra forwards on that call's input; cached in memory, and as JSON files in the folder
    ``schedule_cache`` when given); schedule: a file written by ``tomesd-ext calibrate`` (or a
    ``core.schedule.Schedule``), refused when it was measured on another model.
    Applying again replaces the earlier settings. Options and ranges: README "Options"
    (``tomesd_ext.core.TOME_OPTIONS``).
    """
    if schedule is not None:
        if block_ratios is not None or ratio == "auto" or max_error is not None:
            raise OptionError("schedule sets the block ratios: do not combine it with block_ratios or ratio='auto'")
        block_ratios = load_schedule(schedule, denoiser_of(pipe_or_model, transformers=True, motion=True)).settings
    opts = ToMeOptions.create(
        ratio=ratio, max_downsample=max_downsample, sx=sx, sy=sy, use_rand=use_rand, seed=seed,
        merge_attn=merge_attn, merge_crossattn=merge_crossattn, merge_mlp=merge_mlp, mode=mode,
        pool_factor=pool_factor, cfg_layout=cfg_layout, prune_steps=prune_steps, reuse=reuse,
        reuse_steps=reuse_steps, min_tokens=min_tokens, dit_mode=dit_mode, unet_mode=unet_mode, skip_ends=skip_ends,
        st=st, keep_first_frame=keep_first_frame, frame_reach=frame_reach, frame_plan=frame_plan,
        block_ratios=block_ratios, max_error=max_error,
    )
    second = second_denoisers(pipe_or_model)
    _install(pipe_or_model, opts, schedule_cache=schedule_cache)
    for model in second:  # two-expert pipelines: both transformers
        _install(model, opts, schedule_cache=schedule_cache)
    return pipe_or_model


def apply_query_merge(pipe_or_model, ratio: float = 0.3, *, seed=None, max_downsample=1, min_tokens=0):
    """Patch in place with queries-only merging (ComfyUI built-in style); returns the argument.

    The same plan as apply_tome (window partition, cosine matching on norm1(x)), but keys and
    values keep all N tokens. ratio in [0, 0.75]; max_downsample 1 as in ComfyUI (SDXL then merges
    nothing, like the original). Stored as an apply_tome patch: ``remove_tome`` undoes it. On a
    UNetMotionModel the frames of a clip share one plan (frame_plan "shared").
    """
    opts = ToMeOptions.create(ratio=ratio, seed=seed, max_downsample=max_downsample, min_tokens=min_tokens)
    return _install(pipe_or_model, opts, queries_only=True)


def remove_tome(pipe_or_model):
    """Undo apply_tome / apply_query_merge (a no-op on an unpatched model); returns the argument."""
    for model in second_denoisers(pipe_or_model):
        uninstall_patch(model, PATCH_ATTR)
    return uninstall_patch(pipe_or_model, PATCH_ATTR)


def tome_schedule(pipe_or_model):
    """The per-block settings in effect on a patched model as a ``core.schedule.Schedule`` (with
    ratio="auto": the latest call's choice and what its search measured; ``.save(path)`` writes a
    file ``apply_tome(schedule=path)`` loads), or None (no patch, no per-block settings, or no
    call yet)."""
    patch = installed_patch(pipe_or_model, PATCH_ATTR)
    if patch is None:
        return None
    auto = getattr(patch, "auto", None)
    if auto is not None:
        return auto.last
    settings = patch.runtime.settings
    return None if settings is None else Schedule(settings, model_fingerprint(patch.model))


def tome_options(pipe_or_model):
    """The ToMeOptions in effect on a patched model, or None."""
    patch = installed_patch(pipe_or_model, PATCH_ATTR)
    return patch.opts if patch is not None else None

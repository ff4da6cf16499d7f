"""The runtime of one patched denoiser, shared by every adapter (diffusers, ComfyUI).

An adapter builds one ``MergeRuntime`` per patch with the policy of its method and calls it at
its attachment points:

- ``begin_call(latent_hw, step_key, sigma, device, clip_frames)`` before the denoiser's blocks run
  (a forward pre-hook, a ComfyUI diffusion-model wrapper): the latent size, the step key every
  random draw is keyed on, whether sigma lies inside the sampling window, and (a UNet with
  motion modules) the frames per clip of the batch; ``end_call()`` after it;
- ``level(n_tokens)``: the (h, w) grid of a token sequence at a merged level, or None;
- ``BlockSlot.get(metric)``: the merge plan of the block call in progress, computed once by the
  first merged operator of the block from its own normed input and shared by the others
  (plan-based policies: ToMe, importance, queries-only).

Policies (given at construction): ``TomePolicy`` (core/tome.py), ``ImportancePolicy``
(core/importance.py), ``VidToMePolicy`` (core/temporal.py), ``ToDoPolicy`` (core/downsample.py).
A plan-based policy has ``plan(metric, h, w, seed) -> MergePlan | None``; the runtime adds the
level check, the auto-skip of small grids, the keyed seed, plan reuse (``PlanCache``) and, for a
call whose batch holds clips of frames (AnimateDiff), the plan shared by a clip's frames
(``opts.frame_plan``: the policy plans on ``clip_metric`` and every frame gets its clip's plan). A
policy with ``on_call(step_key)`` hears of every denoiser call (importance: the step count).

Per-block settings (core/schedule.py): ``settings`` (from ``opts.block_ratios``, or chosen by the
error-budget search of ``ratio="auto"``) gives each block group its ratio and sampling window.
Slots are numbered (``block_of``: scope -> number) in the order the adapter creates them
(execution order), counting only those at a merged level (``new_slot(downsample=...)``); ``begin_call(progress=...)`` tells the runtime
how far sampling is, for the windows. Every block call's token count and width are kept in
``block_shapes`` (the search's cost model).

torch.compile: a policy with ``draw_partition(h, w, seed, device, frames)`` (ToMe) has the random
partitions of every grid the call merges drawn in ``begin_call`` (which adapters run outside the
compiled graph), into tensors that are kept and refilled in place. The blocks then only read
tensors: no graph break at the draw, and no recompilation when the step (the seed) changes.

Gradient checkpointing: a checkpointed block runs again during backward, after the call ended.
A call with gradients on keeps, per block call, the call's state and the plan it used, weakly
keyed by the block's input tensor (``BlockSlot.enter``); the recomputation finds them through its
input (the same tensor, or a detached view of it) and replays them, so it merges exactly as the
forward did. Plans are computed without gradients (they are indices: nothing flows through them).
"""

from __future__ import annotations

import logging
import threading
from typing import Hashable, Optional, Tuple

import torch
from torch.utils.weak import WeakTensorKeyDictionary

from .grid import level_grid, level_sizes
from .matching import clip_metric
from .plan import MergePlan
from .plan_cache import PlanCache
from .schedule import group_of
from .tome import partition_seed

log = logging.getLogger("tomesd_ext")


class MergeRuntime:
    """Call state, plan cache and policy of one patch.

    max_downsample: levels with a larger downsample factor are left alone (an int: the adapter
    resolves "auto" from the model). sigma_start >= sigma_end: the sampling window (ComfyUI's
    start/end percent); calls outside it merge nothing.
    """

    def __init__(self, policy, max_downsample: int, sigma_start: float = float("inf"), sigma_end: float = 0.0):
        self.policy = policy
        self.opts = policy.opts
        self.max_downsample = max_downsample
        self.sigma_start = sigma_start
        self.sigma_end = sigma_end
        self.latent_hw: Optional[Tuple[int, int]] = None
        self.frames = 1  # > 1: the call's tokens are a frames x h x w video grid (transformers)
        self.clip_frames = 1  # > 1: rows b*F .. b*F + F - 1 of the batch are the F frames of clip b (AnimateDiff)
        self.step_key = 0.0
        self.active = False
        reuses = getattr(self.opts, "reuses_plans", False)
        self.cache: Optional[PlanCache] = PlanCache(self.opts.reuse_steps) if reuses else None
        self._slots = 0
        self._caller: Optional[int] = None  # thread of the call in progress
        self._skip_said = False
        self.drawn_on = None  # the device of this call's drawn partitions (None: none drawn)
        self.drawn = {}  # (frames, h, w) -> (dst, src) partition of this call (policies with draw_partition)
        self.context = None  # an adapter's per-call state object (its attributes are kept for recomputations)
        self.recording = False  # this call keeps its blocks' plans (gradients on: a backward may recompute them)
        self.recorded = False  # some call kept plans (a recomputation may look them up)
        self.replaying = False  # a block recomputation replays a kept call
        self._snapshot = None
        self.settings = getattr(self.opts, "block_ratios", None)  # per-group BlockSettings, or None: opts.ratio
        self.n_blocks = 0  # slots at a merged level (numbered 0..n_blocks-1 in creation order)
        self.block_of = {}  # slot scope -> its block number
        self.block_shapes = {}  # block number -> (tokens, channels) of its last merged-level call
        self.record_shapes = False  # fill block_shapes (the budget search and calibrate turn it on)
        self.progress: Optional[float] = None  # fraction of sampling done (None: unknown)

    def begin_call(self, latent_hw, step_key: float, sigma=None, device=None, clip_frames: int = 1,
                   progress: Optional[float] = None) -> None:
        """A denoiser call starts: latent (H, W) (or, for a video transformer, the token grid
        (frames, h, w)), its step key (``timestep_key``), its sigma (a number, a tensor whose
        first entry is used, or None: no window), the device of its tensors (given: partitions
        are drawn now, see the module docstring; None: by the first block that needs one).
        clip_frames: a UNet with motion modules runs its spatial blocks on batch x frames rows,
        the F = clip_frames frames of each clip consecutive; 1 otherwise. progress: the fraction
        of sampling done (the windows of per-block settings), None when unknown.

        The call state lives on the patched model, so one model must not run in two threads at
        once: a call that starts while another thread's call is in progress raises RuntimeError.
        """
        me = threading.get_ident()
        if self._caller is not None and self._caller != me:
            raise RuntimeError(
                "tomesd-ext: this patched model is already running in another thread; its merge state is per "
                "model, so use one patched model per thread (copy.deepcopy(model) gives an independent copy)"
            )
        self._caller = me
        self.frames = 1
        self.clip_frames = max(1, int(clip_frames))
        if latent_hw is not None and len(latent_hw) == 3:
            self.frames, latent_hw = int(latent_hw[0]), tuple(latent_hw[1:])
        self.latent_hw = latent_hw
        self.step_key = step_key
        self.progress = progress
        if sigma is not None and hasattr(sigma, "flatten"):
            sigma = float(sigma.flatten()[0].item())
        in_window = sigma is None or self.sigma_end <= float(sigma) <= self.sigma_start
        self.active = latent_hw is not None and in_window
        self.replaying = False
        self.recording = self.active and torch.is_grad_enabled()
        self.recorded = self.recorded or self.recording
        self._snapshot = None
        self.drawn_on = None
        if self.active and device is not None and hasattr(self.policy, "draw_partition"):
            self._draw_partitions(torch.device(device))
        if self.cache is not None:
            self.cache.begin_call(step_key)
        on_call = getattr(self.policy, "on_call", None)
        if on_call is not None:
            on_call(step_key)

    def merged_grids(self):
        """The (frames, h, w) grids this call may merge: the video grid, or one per UNet level up
        to max_downsample (a transformer's image grid is its level 1)."""
        if self.latent_hw is None:
            return []
        if self.frames > 1:
            return [(self.frames, *self.latent_hw)]
        return [(1, h, w) for _d, h, w in level_sizes(self.latent_hw, self.max_downsample)]

    def _draw_partitions(self, device: torch.device) -> None:
        """Draw the partition of every merged grid of this call into the kept tensors."""
        for f, h, w in self.merged_grids():
            if self.below_min_tokens((f,) * (f > 1) + (h, w)):
                continue
            dst, src = self.policy.draw_partition(h, w, self._seed(f, h, w), device, f)
            held = self.drawn.get((f, h, w))
            if held is not None and held[0].shape == dst.shape and held[0].device == device:
                held[0].copy_(dst)
                held[1].copy_(src)
            else:
                self.drawn[(f, h, w)] = (dst.clone(), src.clone())
        self.drawn_on = device

    def _seed(self, f: int, h: int, w: int):
        opts = self.opts
        return partition_seed(opts, self.step_key, f, h, w) if f > 1 else partition_seed(opts, self.step_key, h, w)

    def end_call(self) -> None:
        if self._caller == threading.get_ident():
            self._caller = None
        self.active = self.recording = False

    def snapshot(self) -> tuple:
        """The state of the call in progress a recomputation needs (one tuple per call)."""
        if self._snapshot is None:
            context = dict(vars(self.context)) if self.context is not None else None
            self._snapshot = (self.latent_hw, self.frames, self.step_key, context)
        return self._snapshot

    def replay(self, snapshot: tuple) -> None:
        """Run a block recomputation as part of the kept call ``snapshot`` (``end_replay`` after)."""
        self.latent_hw, self.frames, self.step_key, context = snapshot
        if context is not None:
            vars(self.context).update(context)
        self.active = self.replaying = True
        self.drawn_on = None  # the kept plan is used: nothing is drawn

    def end_replay(self) -> None:
        self.active = self.replaying = False

    def level(self, n_tokens: int) -> Optional[Tuple[int, int]]:
        """(h, w) when a sequence of n_tokens is the grid of a merged level of this call, else None
        (an unknown latent size, a level deeper than max_downsample, tokens that are no grid)."""
        if self.latent_hw is None:
            return None
        if self.frames > 1:  # a video token grid: merged as a whole, at its own size only
            h, w = self.latent_hw
            return (h, w) if n_tokens == self.frames * h * w else None
        found = level_grid(n_tokens, self.latent_hw)
        if found is None or found[0] > self.max_downsample:
            return None
        return found[1], found[2]

    def block_ratio(self, block: Optional[int]) -> float:
        """The ratio of block number ``block`` in this call (its group's setting at ``progress``;
        a slot without a number takes the first group's)."""
        settings = self.settings
        group = 0 if block is None else group_of(block, self.n_blocks, len(settings))
        return settings[group].at(self.progress)

    def plan_for(self, metric: torch.Tensor, scope: Hashable = None) -> Optional[MergePlan]:
        """The plan for metric (B, N, C) of one block call, or None when its level is not merged.

        One partition per (seed, step, level): every block of a level draws the same destinations
        in a step (matching stays per block), so both adapters agree exactly. Grids below
        ``opts.min_tokens`` are not merged (auto-skip). With plan reuse the plan comes from the
        cache, keyed by level (reuse="level") or by the block's scope, and by batch and device.
        A call of clips (``clip_frames`` > 1) with ``opts.frame_plan`` "shared" plans once per clip
        on ``clip_metric`` and gives every frame its clip's plan; "per-frame" plans every row.
        """
        if metric.ndim != 3:
            return None
        grid = self.level(metric.shape[1])
        if grid is None:
            return None
        h, w = grid
        f = self.frames
        opts = self.opts
        if self.below_min_tokens((f,) * (f > 1) + (h, w)):
            return None
        video = {"frames": f} if f > 1 else {}
        ratio = None
        block = None
        if self.record_shapes or self.settings is not None:
            # only then: a compiled block would otherwise guard on its scope and the dict (a
            # recompile per block); plain merging needs no block number
            block = self.block_of.get(scope)
            if block is not None and self.record_shapes:
                self.block_shapes[block] = (metric.shape[1], metric.shape[2])
        if self.settings is not None:
            ratio = self.block_ratio(block)
            if ratio == 0.0:
                return None
            video["ratio"] = ratio
        if self.drawn_on is not None and self.drawn_on == metric.device and (f, h, w) in self.drawn:
            # drawn in begin_call: no seed (a Python number) is touched here
            video["partition"] = self.drawn[(f, h, w)]
            seed = None
        else:
            seed = self._seed(f, h, w)
        clips = self.clip_frames
        if clips > 1 and opts.frame_plan == "shared" and metric.shape[0] % clips == 0:
            def compute():
                plan = self.policy.plan(clip_metric(metric, clips), h, w, seed, **video)
                return None if plan is None else plan.repeat_rows(clips)
        else:
            def compute():
                return self.policy.plan(metric, h, w, seed, **video)
        if self.cache is None:
            return compute()
        key = (None if opts.reuse == "level" else scope, f, h, w, metric.shape[0], metric.device, ratio)
        return self.cache.get(key, compute)

    def below_min_tokens(self, shape) -> bool:
        """Whether a token grid of this shape ((h, w) or (frames, h, w)) is below ``opts.min_tokens``
        (auto-skip: merging cannot pay at this token count); the first time, one log line says so."""
        n = 1
        for side in shape:
            n *= side
        if n >= self.opts.min_tokens:
            return False
        if not self._skip_said:
            self._skip_said = True
            log.warning(
                "tomesd-ext: the %s token grid (%d tokens) is below min_tokens=%d, so it is not merged "
                "(merging does not pay there); pass min_tokens=0 to merge it anyway (said once per patch)",
                "x".join(map(str, shape)), n, self.opts.min_tokens,
            )
        return True

    @property
    def grid_tokens(self) -> int:
        """Tokens of the call's grid at full resolution (frames * H * W); 0 when unknown."""
        return 0 if self.latent_hw is None else self.frames * self.latent_hw[0] * self.latent_hw[1]

    @property
    def grid_shape(self) -> tuple:
        """The call's full-resolution grid: (h, w), or (frames, h, w) for a video."""
        return ((self.frames,) if self.frames > 1 else ()) + tuple(self.latent_hw or ())

    def new_slot(self, scope: Hashable = None, downsample: int = 1) -> "BlockSlot":
        """A slot for one block (scope: its cache key; default a fresh number), created in
        execution order; downsample: the level the block runs at (a block at a level deeper than
        max_downsample gets no block number)."""
        if scope is None:
            self._slots += 1
            scope = self._slots
        if downsample <= self.max_downsample:
            self.block_of[scope] = self.n_blocks
            self.n_blocks += 1
        return BlockSlot(self, scope)


class BlockSlot:
    """The plan of the block call in progress, shared by the operators merged in that block.

    ``enter(key)`` at the start of every block call and ``leave()`` at its end (``reset()`` alone
    where no recomputation can happen); ``get(metric)`` computes the plan from the first metric
    asked for while the call is active, and returns it to every operator whose input has the
    plan's token count (None otherwise). ``merged`` names the operators whose output must be
    unmerged. ``records``: the kept plans of this block's calls (module docstring).
    """

    __slots__ = ("runtime", "scope", "plan", "ready", "merged", "records", "record", "replaying")

    def __init__(self, runtime: MergeRuntime, scope: Hashable = None):
        self.runtime = runtime
        self.scope = scope
        self.records = WeakTensorKeyDictionary()  # block input -> [call snapshot, plan]
        self.replaying = False
        self.reset()

    def __getstate__(self):  # copies and pickles keep no plans of calls of the original
        return {k: getattr(self, k) for k in ("runtime", "scope")}

    def __setstate__(self, state):
        self.__init__(state["runtime"], state["scope"])

    def reset(self, scope: Hashable = None) -> None:
        if scope is not None:
            self.scope = scope
        self.plan: Optional[MergePlan] = None
        self.ready = False
        self.merged = set()
        self.record = None

    def enter(self, key=None) -> None:
        """A block call starts: reset; with gradients on, keep this call's plan under the block's
        input; outside a call (a checkpoint recomputation), replay the plan kept for this input.
        key: the block's input tensor, or a function returning it (only called when needed)."""
        self.reset()
        rt = self.runtime
        if rt.recording or (rt.recorded and (not rt.active or rt.replaying)):
            self._keep_or_replay(key)

    @torch.compiler.disable  # a weak dictionary: outside a compiled graph (only with gradients on)
    def _keep_or_replay(self, key) -> None:
        rt = self.runtime
        if rt.replaying:
            rt.end_replay()
        key = key() if callable(key) else key
        if not isinstance(key, torch.Tensor):
            return
        if rt.active:
            self.record = [rt.snapshot(), None]
            self.records[key] = self.record
            return
        record = self.records.get(key)
        if record is None:  # a reentrant checkpoint recomputes from detached views of its inputs
            record = next((r for k, r in self.records.items() if _same_memory(k, key)), None)
        if record is not None:
            rt.replay(record[0])
            self.plan, self.ready, self.replaying = record[1], True, True

    def leave(self) -> None:
        """A block call ends (also on an exception): forget the plan; end a replay."""
        if self.replaying:
            self.replaying = False
            self.runtime.end_replay()
        self.reset()

    def get(self, metric: torch.Tensor) -> Optional[MergePlan]:
        if not self.ready:
            self.ready = True
            if self.runtime.active:
                with torch.no_grad():  # a plan is indices and counts: no gradient flows through it
                    self.plan = self.runtime.plan_for(metric, self.scope)
                if self.record is not None:
                    self.record[1] = self.plan
        plan = self.plan
        if plan is None or metric.ndim != 3 or metric.shape[1] != plan.n_tokens:
            return None
        return plan


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether b views exactly the elements of a (a live tensor: its memory is not reused)."""
    return (
        a.device == b.device and a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
        and a.numel() > 0 and a.data_ptr() == b.data_ptr()
    )

"""Validated options of the ToMe policy, shared by every front end.

Every limit is written once here and reported the same way by diffusers, ComfyUI and the CLI.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from typing import Optional, Union


class OptionError(ValueError):
    """An option is outside its allowed range; the message names argument, value and range."""


def check_int(name: str, value, lo: int, hi: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise OptionError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < lo or (hi is not None and value > hi):
        rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise OptionError(f"{name}={value} is out of range: allowed {rng}")
    return value


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise OptionError(f"{name} must be True or False, got {value!r}")
    return value


def check_ratio(name: str, value, maximum: float, why: str) -> float:
    """Ratio in [0, 1); above `maximum` it is clamped with one warning naming the maximum."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise OptionError(f"{name} must be a number in [0, 1), got {value!r}")
    value = float(value)
    if not (0.0 <= value < 1.0):
        raise OptionError(f"{name}={value} is out of range: allowed [0, 1)")
    if value > maximum:
        warnings.warn(
            f"{name}={value} exceeds the maximum {maximum:.4g} ({why}); using {maximum:.4g}",
            stacklevel=3,
        )
        value = maximum
    return value


def check_known(cls, kwargs: dict) -> None:
    """Reject keyword arguments that are not fields of the options dataclass `cls`."""
    unknown = set(kwargs) - set(cls.__dataclass_fields__)
    if unknown:
        allowed = ", ".join(cls.__dataclass_fields__)
        raise OptionError(f"unknown option(s) {sorted(unknown)}; allowed: {allowed}")


def check_max_downsample(value, allow_auto: bool = True):
    """A downsample factor of MAX_DOWNSAMPLE_CHOICES (or "auto" when allowed)."""
    if allow_auto and value == "auto":
        return value
    if isinstance(value, bool) or value not in MAX_DOWNSAMPLE_CHOICES:
        auto = "'auto' or " if allow_auto else ""
        raise OptionError(f"max_downsample={value!r} is not allowed: use {auto}one of {MAX_DOWNSAMPLE_CHOICES}")
    return value


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise OptionError(f"{name}={value!r} is not allowed: use one of {tuple(choices)}")


def check_option(option, value):
    """Check value against an Option of a table (kinds int, bool, choice, seed); returns it."""
    if option.kind == "int":
        return check_int(option.name, value, option.lo, option.hi)
    if option.kind == "bool":
        return check_bool(option.name, value)
    if option.kind == "choice":
        check_choice(option.name, value, option.choices)
        return value
    if option.kind == "seed":
        return resolve_seed(value)
    raise ValueError(f"check_option does not check {option.kind} options ({option.name})")


def frame_reach_error(frame_reach: int, st: int, unset: str = "None") -> Optional[str]:
    """The message when a frame_reach (not unset) is below st - 1, else None: every token must
    reach its own st-frame window's destination. unset: how the front end writes "any frame"."""
    if frame_reach >= st - 1:
        return None
    return (f"frame_reach={frame_reach} is out of range: allowed {unset} (any frame) or [st - 1, 64] = "
            f"[{st - 1}, 64] with st={st} (a token must reach its own window's destination)")


def resolve_seed(seed) -> int:
    """An int >= 0 as given, or (None) one drawn once from torch's global RNG."""
    if seed is None:
        import torch

        return int(torch.randint(0, 2**62, (1,)).item())
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise OptionError(f"seed must be None or an int >= 0, got {seed!r}")
    return seed


MAX_DOWNSAMPLE_CHOICES = (1, 2, 4, 8, 16, 32, 64)
MODES = ("tome", "importance")
CFG_LAYOUTS = ("auto", "halves", "interleaved", "off")
REUSE_CHOICES = ("block", "level")
DIT_MODES = ("auto", "block", "attn", "kv")
UNET_MODES = ("auto", "ops", "block")
FRAME_PLANS = ("shared", "per-frame")

# Smallest token grid worth merging on CPU (docs/benchmarks.md, "Auto-skip rule").
MIN_TOKENS_DEFAULT = 2048


@dataclass(frozen=True)
class Option:
    """One option of a method, as every front end shows it.

    kind: "float" (lo <= x <= hi, or lo <= x < hi when hi_open), "int" (lo..hi, hi None =
    unbounded), "bool", "choice" (one of choices) or "seed" (None or an int >= 0).
    allowed: the allowed values as the README states them; help: one line, the README's meaning
    column and the ComfyUI tooltip. simple: one of the few options most users set, the ones a
    simple front end shows (ComfyUI's "Token Merging (ToMe)" node); the others keep their
    defaults there.
    """

    name: str
    kind: str
    default: object
    allowed: str
    help: str
    lo: Optional[float] = None
    hi: Optional[float] = None
    hi_open: bool = False
    choices: tuple = ()
    step: Optional[float] = None  # ComfyUI widget step of a float
    simple: bool = False


def _table(*options: Option) -> dict:
    return {o.name: o for o in options}


_MD = ", ".join(str(d) for d in MAX_DOWNSAMPLE_CHOICES)

TOME_OPTIONS = _table(
    Option("ratio", "float", 0.5, "[0, 1) or `\"auto\"`",
           "Fraction of a merged level's tokens merged away; 0 = bit-identical to the unpatched model. At most "
           "1 - 1/(sx*sy) (0.75 for 2x2 windows; importance mode: also 1 - 1/(sx*sy*pool_factor)); larger values "
           "are clamped with a warning. \"auto\" (diffusers, with max_error): chosen per block on the "
           "first call (docs/schedules.md).",
           lo=0.0, hi=1.0, hi_open=True, step=0.01, simple=True),
    Option("max_downsample", "choice", "auto", f"`\"auto\"`, {_MD}",
           "Merge levels with downsample factor <= this; auto = the highest-resolution level that has "
           "attention (SD1.x/2.x: 1, SDXL: 2).", choices=("auto",) + MAX_DOWNSAMPLE_CHOICES),
    Option("sx", "int", 2, "int in [1, 64], `sx*sy ≥ 2`", "Window width: one destination token per sx x sy window.",
           lo=1, hi=64),
    Option("sy", "int", 2, "int in [1, 64], `sx*sy ≥ 2`", "Window height: one destination token per sx x sy window.",
           lo=1, hi=64),
    Option("use_rand", "bool", True, "bool", "Random destination inside each window (seeded); off = the top-left token."),
    Option("seed", "seed", None, "None or int ≥ 0",
           "Seed of the merge pattern, not the noise: partitions are a hash of (seed, step, grid), so the same "
           "seed gives the same image; None draws one once, when the options are created."),
    Option("merge_attn", "bool", True, "bool", "Merge around self-attention (queries, keys and values): the main saving."),
    Option("merge_crossattn", "bool", False, "bool", "Merge the queries of cross-attention (text) too."),
    Option("merge_mlp", "bool", False, "bool", "Merge around the feed-forward too (more speed, less detail)."),
    Option("min_tokens", "int", None, f"None (= {MIN_TOKENS_DEFAULT}) or int ≥ 0",
           f"Auto-skip: levels with fewer tokens are not merged, where merging cannot pay (measured on CPU, "
           f"docs/benchmarks.md); None = {MIN_TOKENS_DEFAULT}, 0 = merge always.", lo=0),
    Option("reuse", "choice", "block", "`\"block\"`, `\"level\"`",
           "block: every block matches on its own tokens; level: the first block of a level computes the plan "
           "and the level's other blocks reuse it.", choices=REUSE_CHOICES),
    Option("reuse_steps", "int", 1, "int in [1, 1000]", "Keep merge plans for this many consecutive steps (1 = recompute every step).",
           lo=1, hi=1000),
    Option("mode", "choice", "tome", "`\"tome\"`, `\"importance\"`",
           "importance: destinations drawn from the tokens with the largest CFG difference |cond - uncond| of the "
           "previous step, unimportant tokens merged first (Wu et al., arXiv 2411.16720; docs/importance.md).",
           choices=MODES),
    Option("pool_factor", "float", 1.4, "[0.5, 4]",
           "Importance mode: size of the pool of important tokens the destinations are drawn from, "
           "(1 - ratio) * pool_factor of the tokens; 1.4 = the paper's SD value.", lo=0.5, hi=4.0, step=0.05),
    Option("cfg_layout", "choice", "auto", "`\"auto\"`, `\"halves\"`, `\"interleaved\"`, `\"off\"`",
           "Importance mode: how cond/uncond rows pair up in the batch (auto: detected from the duplicated latents).",
           choices=CFG_LAYOUTS),
    Option("prune_steps", "int", 0, "int in [0, 10000]",
           "Importance mode: the first steps drop merged tokens instead of averaging them (the paper's prune "
           "phase; its SD demo uses 2). 0 = off.", lo=0, hi=10000),
    Option("dit_mode", "choice", "auto", "`\"auto\"`, `\"block\"`, `\"attn\"`, `\"kv\"`",
           "Transformers (Flux, SD3, PixArt, Wan...): block = image tokens merged through the whole block (attention "
           "and MLP) and its update unmerged; attn = merged around attention only; kv = keys and values only, "
           "queries kept; auto = the family's measured default. UNets ignore it.", choices=DIT_MODES),
    Option("unet_mode", "choice", "auto", "`\"auto\"`, `\"ops\"`, `\"block\"`",
           "UNets (SD 1.x/2.x, SDXL, AnimateDiff): ops = ToMe-SD, merged around the operators merge_attn, "
           "merge_crossattn and merge_mlp name, each output copied back; block = a transformer block's tokens merged "
           "once, self-attention, cross-attention and feed-forward run on them, the block's update copied back "
           "(faster at a higher error, merge_* ignored); auto = the measured default, ops (docs/benchmarks.md). "
           "Transformers ignore it.", choices=UNET_MODES),
    Option("st", "int", 2, "int in [1, 16]",
           "Video transformers: window depth in latent frames, one destination per st x sy x sx window, so "
           "tokens merge across neighbouring frames; 1 = per-frame windows. Images ignore it.", lo=1, hi=16),
    Option("keep_first_frame", "bool", False, "bool",
           "Video transformers: the first latent frame (an image-to-video conditioning frame) is never merged.",),
    Option("frame_reach", "int", None, "None or int in [st - 1, 64]",
           "Video transformers: a token merges only into a destination at most this many latent frames away; "
           "None = any frame, 0 (with st=1) = its own frame (spatial-only merging, no mixing across frames).",
           lo=0, hi=64),
    Option("frame_plan", "choice", "shared", "`\"shared\"`, `\"per-frame\"`",
           "AnimateDiff (UNets with motion modules): shared = one merge plan per clip, matched on the mean of its "
           "frames' normalised tokens, so every frame merges the same regions; per-frame = each frame matched on "
           "its own tokens. Other models ignore it.", choices=FRAME_PLANS),
    Option("skip_ends", "int", None, "None or int in [0, 64]",
           "Transformers: this many blocks at each end of the network stay unmerged; None = the family's "
           "measured default. A value that leaves no block to merge (2 * skip_ends >= the model's blocks) is an "
           "OptionError when the model is patched. UNets ignore it.", lo=0, hi=64),
    Option("block_ratios", "schedule", None, "None or a list of ratios / `{ratio, start, end}`",
           "Per-block settings (mode tome): the merging blocks, in execution order, split into one consecutive "
           "group per entry; each entry is its group's ratio, and may limit it to a part of sampling [start, end] "
           "(fractions done). Replaces ratio (docs/schedules.md)."),
    Option("max_error", "float", None, "None or (0, 1]",
           "With ratio=\"auto\": the largest relative error of the denoiser output allowed; the first merged call "
           "measures the output unmerged, each group of blocks' sensitivity and candidate ratios per group (at most 12 "
           "extra forwards, once per input shape), and keeps the cheapest measured within it (docs/schedules.md).", lo=0.0, hi=1.0, step=0.001),
)


@dataclass(frozen=True)
class ToMeOptions:
    """Options of ToMe-SD (Bolya & Hoffman 2023), validated on construction via `create`.

    ratio: fraction of a level's tokens merged away, in [0, 1 - 1/(sx*sy)].
    max_downsample: "auto" (the highest-resolution level that has attention) or 1/2/4/8...
    sx, sy: destination window (one destination per sx*sy tokens).
    use_rand: random destination inside each window (else the top-left one).
    seed: base seed of the partition generator; None draws one from torch's global RNG
        once, when the options are created.
    merge_attn / merge_crossattn / merge_mlp: which operators of a block are wrapped.
    mode: "tome" (random window destinations) or "importance" (destinations drawn from the
        tokens with the largest classifier-free-guidance difference, core/importance.py).
    pool_factor: importance mode: pool size M = (N - r) * pool_factor, in [0.5, 4]; the ratio
        maximum is min(1 - 1/(sx*sy), 1 - 1/(sx*sy*pool_factor)).
    cfg_layout: importance mode: how the CFG batch pairs rows, "auto" (detected from the
        input), "halves", "interleaved" or "off" (no map: ToMe windows).
    prune_steps: importance mode: the first prune_steps denoiser calls of a run drop merged
        sources instead of averaging them (the paper's prune phase; its SD demo uses 2).
    reuse: "block" (every block matches on its own metric, ToMe-SD) or "level" (the first block
        of a level to run in a step computes the plan, the level's other blocks reuse it).
    reuse_steps: keep plans for this many consecutive steps (1 = recompute every step).
    unet_mode: UNets only (core/block.py): "ops" (ToMe-SD: merged around the operators merge_*
        name) or "block" (the whole transformer block runs on merged tokens, its update unmerged);
        "auto" takes the measured default.
    dit_mode, skip_ends: transformers only (core/dit.py): "block" or "kv" merging, and the blocks
        left unmerged at each end; "auto" / None take the family's measured defaults.
    st, keep_first_frame, frame_reach: video transformers only: the window depth in latent frames,
        whether the first latent frame (image-to-video conditioning) stays unmerged, and how many
        frames away a token may find its destination (None: any; at least st - 1, so every token
        reaches its own window's destination).
    frame_plan: UNets with motion modules (AnimateDiff) only: "shared" (one plan per clip from the
        mean of its frames' normalised metrics, the same groups in every frame) or "per-frame"
        (every frame matched on its own metric; the window partition is the same either way).
    min_tokens: levels whose grid has fewer tokens are not merged (merging cannot pay there:
        the matching and bookkeeping cost more than the smaller attention saves; the default
        comes from the measurement in docs/benchmarks.md, "Auto-skip rule"). 0 = merge always;
        None = MIN_TOKENS_DEFAULT, read when the options are created.
    """

    ratio: float = 0.5
    max_downsample: Union[int, str] = "auto"
    sx: int = 2
    sy: int = 2
    use_rand: bool = True
    seed: Optional[int] = None
    merge_attn: bool = True
    merge_crossattn: bool = False
    merge_mlp: bool = False
    mode: str = "tome"
    pool_factor: float = 1.4
    cfg_layout: str = "auto"
    prune_steps: int = 0
    reuse: str = "block"
    reuse_steps: int = 1
    min_tokens: Optional[int] = None
    dit_mode: str = "auto"
    unet_mode: str = "auto"
    skip_ends: Optional[int] = None
    st: int = 2
    keep_first_frame: bool = False
    frame_reach: Optional[int] = None
    frame_plan: str = "shared"
    block_ratios: Optional[tuple] = None
    max_error: Optional[float] = None

    @classmethod
    def create(cls, **kwargs) -> "ToMeOptions":
        check_known(cls, kwargs)
        o = cls(**kwargs)
        table = TOME_OPTIONS
        sx = check_option(table["sx"], o.sx)
        sy = check_option(table["sy"], o.sy)
        if sx * sy < 2:
            raise OptionError(f"sx*sy must be >= 2 (one destination per window), got sx={sx}, sy={sy}")
        check_max_downsample(o.max_downsample)
        check_option(table["mode"], o.mode)
        maximum = 1.0 - 1.0 / (sx * sy)
        why = f"one destination per {sx}x{sy} window"
        pool_factor = o.pool_factor
        if o.mode == "importance":
            lo, hi = table["pool_factor"].lo, table["pool_factor"].hi
            if isinstance(pool_factor, bool) or not isinstance(pool_factor, (int, float)):
                raise OptionError(f"pool_factor must be a number in [{lo}, {hi}], got {pool_factor!r}")
            pool_factor = float(pool_factor)
            if not lo <= pool_factor <= hi:
                raise OptionError(f"pool_factor={pool_factor} is out of range: allowed [{lo}, {hi}]")
            pool_max = 1.0 - 1.0 / (sx * sy * pool_factor)
            if pool_max < maximum:
                maximum = pool_max
                why = f"the importance pool of (1 - ratio) * pool_factor={pool_factor} must hold the 1/{sx * sy} destinations"
            check_option(table["prune_steps"], o.prune_steps)
            check_option(table["cfg_layout"], o.cfg_layout)
        elif o.prune_steps != 0:
            raise OptionError(f"prune_steps={o.prune_steps!r} applies to mode='importance' only (mode={o.mode!r})")
        block_ratios, ratio = None, o.ratio
        if ratio == "auto" or o.max_error is not None or o.block_ratios is not None:
            block_ratios, ratio = _schedule_options(o, maximum)
        ratio = check_ratio("ratio", ratio, maximum, why)
        min_tokens = MIN_TOKENS_DEFAULT if o.min_tokens is None else check_option(table["min_tokens"], o.min_tokens)
        for name in ("use_rand", "merge_attn", "merge_crossattn", "merge_mlp"):
            check_option(table[name], getattr(o, name))
        if not (o.merge_attn or o.merge_crossattn or o.merge_mlp):
            raise OptionError("merge_attn, merge_crossattn and merge_mlp are all False: nothing to merge")
        check_option(table["reuse"], o.reuse)
        check_option(table["reuse_steps"], o.reuse_steps)
        check_option(table["dit_mode"], o.dit_mode)
        check_option(table["unet_mode"], o.unet_mode)
        check_option(table["st"], o.st)
        check_option(table["keep_first_frame"], o.keep_first_frame)
        if o.frame_reach is not None:
            check_option(table["frame_reach"], o.frame_reach)
            error = frame_reach_error(o.frame_reach, o.st)
            if error:
                raise OptionError(error)
        check_option(table["frame_plan"], o.frame_plan)
        if o.skip_ends is not None:
            check_option(table["skip_ends"], o.skip_ends)
        seed = resolve_seed(o.seed)
        return replace(o, ratio=ratio, seed=seed, pool_factor=pool_factor, min_tokens=min_tokens,
                       block_ratios=block_ratios, max_error=None if o.max_error is None else float(o.max_error))

    @property
    def auto(self) -> bool:
        """ratio="auto": the block ratios are chosen at the first merged call (max_error set)."""
        return self.max_error is not None

    @property
    def reuses_plans(self) -> bool:
        """Whether plans are kept beyond one block call (reuse="level" or reuse_steps > 1)."""
        return self.reuse == "level" or self.reuse_steps > 1



def _schedule_options(o, maximum: float):
    """(block_ratios, ratio) of options with ratio="auto", max_error or block_ratios: validated,
    exclusive of each other as the table says. An auto ratio is stored as ``maximum``, the largest
    ratio the search tries."""
    from .schedule import block_settings

    if o.mode != "tome":
        raise OptionError(f"ratio='auto', max_error and block_ratios apply to mode='tome' only (mode={o.mode!r})")
    if o.block_ratios is not None:
        if o.ratio == "auto" or o.max_error is not None:
            raise OptionError("block_ratios sets the ratios by hand: do not combine it with ratio='auto' / max_error")
        settings = block_settings(o.block_ratios, maximum)
        return settings, max(s.ratio for s in settings)
    if o.ratio != "auto":
        raise OptionError(f"max_error={o.max_error!r} needs ratio='auto' (ratio={o.ratio!r} is fixed)")
    e = o.max_error
    if e is None:
        raise OptionError("ratio='auto' needs max_error, the largest relative output error allowed, in (0, 1]")
    if isinstance(e, bool) or not isinstance(e, (int, float)) or not 0.0 < e <= 1.0:
        raise OptionError(f"max_error={e!r} is out of range: allowed (0, 1]")
    return None, maximum

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
POOL_FACTOR_RANGE = (0.5, 4.0)
REUSE_CHOICES = ("block", "level")

# Smallest token grid worth merging on CPU (docs/benchmarks.md, "Auto-skip rule").
MIN_TOKENS_DEFAULT = 2048


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

    @classmethod
    def create(cls, **kwargs) -> "ToMeOptions":
        check_known(cls, kwargs)
        o = cls(**kwargs)
        sx = check_int("sx", o.sx, 1, 64)
        sy = check_int("sy", o.sy, 1, 64)
        if sx * sy < 2:
            raise OptionError(f"sx*sy must be >= 2 (one destination per window), got sx={sx}, sy={sy}")
        md = o.max_downsample
        if md != "auto" and (isinstance(md, bool) or md not in MAX_DOWNSAMPLE_CHOICES):
            raise OptionError(
                f"max_downsample={md!r} is not allowed: use 'auto' or one of {MAX_DOWNSAMPLE_CHOICES}"
            )
        if o.mode not in MODES:
            raise OptionError(f"mode={o.mode!r} is not allowed: use one of {MODES}")
        maximum = 1.0 - 1.0 / (sx * sy)
        why = f"one destination per {sx}x{sy} window"
        pool_factor = o.pool_factor
        if o.mode == "importance":
            lo, hi = POOL_FACTOR_RANGE
            if isinstance(pool_factor, bool) or not isinstance(pool_factor, (int, float)):
                raise OptionError(f"pool_factor must be a number in [{lo}, {hi}], got {pool_factor!r}")
            pool_factor = float(pool_factor)
            if not lo <= pool_factor <= hi:
                raise OptionError(f"pool_factor={pool_factor} is out of range: allowed [{lo}, {hi}]")
            pool_max = 1.0 - 1.0 / (sx * sy * pool_factor)
            if pool_max < maximum:
                maximum = pool_max
                why = f"the importance pool of (1 - ratio) * pool_factor={pool_factor} must hold the 1/{sx * sy} destinations"
            check_int("prune_steps", o.prune_steps, 0, 10000)
            if o.cfg_layout not in CFG_LAYOUTS:
                raise OptionError(f"cfg_layout={o.cfg_layout!r} is not allowed: use one of {CFG_LAYOUTS}")
        elif o.prune_steps != 0:
            raise OptionError(f"prune_steps={o.prune_steps!r} applies to mode='importance' only (mode={o.mode!r})")
        ratio = check_ratio("ratio", o.ratio, maximum, why)
        min_tokens = MIN_TOKENS_DEFAULT if o.min_tokens is None else check_int("min_tokens", o.min_tokens, 0)
        for name in ("use_rand", "merge_attn", "merge_crossattn", "merge_mlp"):
            check_bool(name, getattr(o, name))
        if not (o.merge_attn or o.merge_crossattn or o.merge_mlp):
            raise OptionError("merge_attn, merge_crossattn and merge_mlp are all False: nothing to merge")
        if o.reuse not in REUSE_CHOICES:
            raise OptionError(f"reuse={o.reuse!r} is not allowed: use one of {REUSE_CHOICES}")
        check_int("reuse_steps", o.reuse_steps, 1, 1000)
        seed = resolve_seed(o.seed)
        return replace(o, ratio=ratio, seed=seed, pool_factor=pool_factor, min_tokens=min_tokens)

    @property
    def reuses_plans(self) -> bool:
        """Whether plans are kept beyond one block call (reuse="level" or reuse_steps > 1)."""
        return self.reuse == "level" or self.reuse_steps > 1

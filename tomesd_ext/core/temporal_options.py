"""Validated options of the VidToMe policy (Li et al., CVPR 2024), shared by every front end."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

from .options import MAX_DOWNSAMPLE_CHOICES, OptionError, check_bool, check_int, check_known, check_ratio, resolve_seed


def _check_probability(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise OptionError(f"{name}={value!r} is out of range: allowed a number in [0, 1]")
    return float(value)


@dataclass(frozen=True)
class VidToMeOptions:
    """Options of VidToMe temporal merging (Li et al., VidToMe, CVPR 2024).

    chunk_size: frames per UNet call (B of the paper), 1..64; the first chunk of every step has a
        random length in [1, chunk_size] and chunks run in random order.
    local_ratio: fraction of the non-target frames' tokens merged into the chunk's target frame
        ("replace" merge: merged tokens take the target token's value), in [0, 1).
    global_ratio: fraction of the source side merged in the global merge with the token set
        carried across the chunks of one step, in [0, 1); 0 turns the global set off.
    max_downsample: merge at levels with downsample factor <= this (2: SD1.5's 64^2 and 32^2
        levels at 512^2).
    global_rand: probability that the global set is the source side (else the local tokens are).
    align_batch: CFG samples share one match map (best destination over all samples).
    seed: base seed of every draw (chunking, target frame, roles); None draws one once.
    """

    chunk_size: int = 4
    local_ratio: float = 0.9
    global_ratio: float = 0.8
    max_downsample: int = 2
    global_rand: float = 0.5
    align_batch: bool = True
    seed: Optional[int] = None

    @classmethod
    def create(cls, **kwargs) -> "VidToMeOptions":
        check_known(cls, kwargs)
        o = cls(**kwargs)
        check_int("chunk_size", o.chunk_size, 1, 64)
        local = check_ratio("local_ratio", o.local_ratio, 1.0, "")
        glob = check_ratio("global_ratio", o.global_ratio, 1.0, "")
        md = o.max_downsample
        if isinstance(md, bool) or md not in MAX_DOWNSAMPLE_CHOICES:
            raise OptionError(f"max_downsample={md!r} is not allowed: use one of {MAX_DOWNSAMPLE_CHOICES}")
        global_rand = _check_probability("global_rand", o.global_rand)
        check_bool("align_batch", o.align_batch)
        seed = resolve_seed(o.seed)
        return replace(o, local_ratio=local, global_ratio=glob, global_rand=global_rand, seed=seed)

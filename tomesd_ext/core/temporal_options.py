"""Validated options of the VidToMe policy (Li et al., CVPR 2024), shared by every front end."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

from .options import (
    MAX_DOWNSAMPLE_CHOICES,
    Option,
    OptionError,
    _table,
    check_known,
    check_max_downsample,
    check_option,
    check_ratio,
)


VIDTOME_OPTIONS = _table(
    Option("chunk_size", "int", 4, "int in [1, 64]",
           "Frames merged together (a chunk; the diffusers pipeline runs one denoiser call per chunk). Every step "
           "the first chunk has a random length in [1, chunk_size] and the chunks run in random order.", lo=1, hi=64),
    Option("local_ratio", "float", 0.9, "[0, 1)",
           "Fraction of the other frames' tokens merged into the chunk's target frame (they take the target "
           "token's value). 0 = no merging inside a chunk.", lo=0.0, hi=1.0, hi_open=True, step=0.01),
    Option("global_ratio", "float", 0.8, "[0, 1)",
           "Fraction of the source side merged with the token set carried from chunk to chunk within a step "
           "(consistency across chunks). 0 = no global set.", lo=0.0, hi=1.0, hi_open=True, step=0.01),
    Option("max_downsample", "choice", 2, ", ".join(str(d) for d in MAX_DOWNSAMPLE_CHOICES),
           "Merge self-attention at levels with this downsample factor or less (2: SD1.5's two "
           "highest-resolution levels).", choices=MAX_DOWNSAMPLE_CHOICES),
    Option("seed", "seed", None, "None or int ≥ 0",
           "Seed of VidToMe's draws (chunk borders and order, target frame, global roles), not the noise: "
           "same seed, same result; None draws one once, when the options are created."),
    Option("global_rand", "float", 0.5, "[0, 1]",
           "Probability that the carried global set is the source side of the global merge (else the chunk's "
           "tokens are).", lo=0.0, hi=1.0, step=0.01),
    Option("align_batch", "bool", True, "bool",
           "CFG samples share one match map (each token's best match over cond and uncond); needs them in one batch."),
)


def _check_probability(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise OptionError(f"{name}={value!r} is out of range: allowed a number in [0, 1]")
    return float(value)


@dataclass(frozen=True)
class VidToMeOptions:
    """Options of VidToMe temporal merging (Li et al., CVPR 2024); ranges in VIDTOME_OPTIONS.

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
        table = VIDTOME_OPTIONS
        check_option(table["chunk_size"], o.chunk_size)
        local = check_ratio("local_ratio", o.local_ratio, 1.0, "")
        glob = check_ratio("global_ratio", o.global_ratio, 1.0, "")
        check_max_downsample(o.max_downsample, allow_auto=False)
        global_rand = _check_probability("global_rand", o.global_rand)
        check_option(table["align_batch"], o.align_batch)
        seed = check_option(table["seed"], o.seed)
        return replace(o, local_ratio=local, global_ratio=glob, global_rand=global_rand, seed=seed)

"""Wall-clock time per transformer-block part (attn1, attn2, ff) and level, by forward hooks.

CPU wall clock (no device synchronisation: read it on the CPU, where calls are synchronous).
Used by scripts/attention_share.py to explain a whole-model speed-up with Amdahl's law.
"""

from __future__ import annotations

import collections
import time
from typing import Dict, Tuple


def part_timer(unet) -> Dict[Tuple[str, int], float]:
    """Register timing hooks on attn1, attn2 and ff of every BasicTransformerBlock of `unet`;
    returns the dict they fill, (part, tokens) -> seconds summed over calls, where tokens is N of
    the part's (B, N, C) hidden states (one entry per level). Clear it between measurements."""
    from diffusers.models.attention import BasicTransformerBlock

    acc = collections.defaultdict(float)
    for block in (m for m in unet.modules() if isinstance(m, BasicTransformerBlock)):
        for part in ("attn1", "attn2", "ff"):
            module, start = getattr(block, part), {}

            def pre(mod, args, kwargs, start=start):
                start["t"], start["n"] = time.perf_counter(), args[0].shape[1] if args else kwargs["hidden_states"].shape[1]

            def post(mod, args, kwargs, out, start=start, part=part):
                acc[(part, start["n"])] += time.perf_counter() - start["t"]

            module.register_forward_pre_hook(pre, with_kwargs=True)
            module.register_forward_hook(post, with_kwargs=True)
    return acc

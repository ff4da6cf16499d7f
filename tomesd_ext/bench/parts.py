"""Wall-clock time per transformer-block part (attn1, attn2, ff) and level of a UNet, and of the
first block of each kind of a diffusion transformer, by forward hooks.

CPU wall clock (no device synchronisation: read it on the CPU, where calls are synchronous).
part_timer is used by scripts/attention_share.py to explain a whole-model speed-up with Amdahl's
law; block_timer by the bench, so a reduced-depth transformer's result can be stated per block.
"""

from __future__ import annotations

import collections
import contextlib
import time
from typing import Dict, List, Tuple

import torch

# Block lists of the diffusion transformers: joint/double-stream blocks (Flux, Flux.2, SD3,
# Qwen-Image, HunyuanVideo; PixArt's and LTX-Video's blocks), the single-stream blocks of Flux and
# HunyuanVideo, Z-Image's main layers, Wan's blocks.
DIT_BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks", "layers", "blocks")


def first_blocks(model) -> Dict[str, object]:
    """{list name: its first block} for the DIT_BLOCK_LISTS that ``model`` has (empty for a UNet)."""
    out = {}
    for name in DIT_BLOCK_LISTS:
        blocks = getattr(model, name, None)
        if isinstance(blocks, torch.nn.ModuleList) and len(blocks):
            out[name] = blocks[0]
    return out


@contextlib.contextmanager
def block_timer(model):
    """Time every call of the first block of each kind (first_blocks) while open; yields
    {list name: [seconds per call]}. Enter it after a method is applied: its post-hook then runs
    after the method's own hooks, so merge and unmerge work inside the block are counted."""
    times: Dict[str, List[float]] = {name: [] for name in first_blocks(model)}
    handles = []
    for name, block in first_blocks(model).items():
        start = {}

        def pre(mod, args, kwargs, start=start):
            start["t"] = time.perf_counter()

        def post(mod, args, kwargs, out, start=start, name=name):
            times[name].append(time.perf_counter() - start["t"])

        handles.append(block.register_forward_pre_hook(pre, with_kwargs=True, prepend=True))
        handles.append(block.register_forward_hook(post, with_kwargs=True))
    try:
        yield times
    finally:
        for handle in handles:
            handle.remove()


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

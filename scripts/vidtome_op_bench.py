"""Operator-level cost of VidToMe: one SD1.5-width self-attention (diffusers Attention, SDPA), chunk F=4, S=2.

Run: python scripts/vidtome_op_bench.py (no model weights; medians of 9, interleaved; timing by
tomesd_ext.bench.timing)."""
import statistics

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from tomesd_ext.bench.timing import interleaved
from tomesd_ext.core import ChunkDraw, VidToMeOptions, temporal_attention

torch.manual_seed(0)
opts = VidToMeOptions.create(seed=0)
p = AttnProcessor2_0()
for N, C in [(1024, 320), (256, 640)]:
    attn = Attention(C, heads=8, dim_head=C // 8).eval()
    x = torch.randn(8, N, C)  # (frames, tokens, channels)
    with torch.no_grad():
        _, g = temporal_attention(x, 2, lambda t: p(attn, t), opts, ChunkDraw(1, True), None)
        ts = interleaved({
            "per-frame": lambda: p(attn, x),
            "vidtome first chunk": lambda: temporal_attention(x, 2, lambda t: p(attn, t), opts, ChunkDraw(1, True), None),
            "vidtome later chunk": lambda: temporal_attention(x, 2, lambda t: p(attn, t), opts, ChunkDraw(1, True), g),
        }, repeats=9)
    print(f"N={N} C={C}: " + ", ".join(f"{k} {statistics.median(v)*1000:.0f} ms [{min(v)*1000:.0f}-{max(v)*1000:.0f}]" for k, v in ts.items()))

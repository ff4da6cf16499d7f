"""Operator-level cost of VidToMe: one SD1.5-width self-attention (diffusers Attention, SDPA), chunk F=4, S=2.

Run: python scripts/vidtome_op_bench.py (no model weights; medians of 9, interleaved)."""
import time, torch, statistics
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from tomesd_ext.core import VidToMeOptions, temporal_attention, ChunkDraw
torch.manual_seed(0)
opts = VidToMeOptions.create(seed=0)
p = AttnProcessor2_0()
for N, C in [(1024, 320), (256, 640)]:
    attn = Attention(C, heads=8, dim_head=C // 8).eval()
    x = torch.randn(8, N, C)
    with torch.no_grad():
        _, g = temporal_attention(x, 2, lambda t: p(attn, t), opts, ChunkDraw(1, True), None)
        ts = {"per-frame": [], "vidtome first chunk": [], "vidtome later chunk": []}
        for i in range(9):
            t = time.perf_counter(); p(attn, x); ts["per-frame"].append(time.perf_counter() - t)
            t = time.perf_counter(); temporal_attention(x, 2, lambda t: p(attn, t), opts, ChunkDraw(1, True), None); ts["vidtome first chunk"].append(time.perf_counter() - t)
            t = time.perf_counter(); temporal_attention(x, 2, lambda t: p(attn, t), opts, ChunkDraw(1, True), g); ts["vidtome later chunk"].append(time.perf_counter() - t)
    print(f"N={N} C={C}: " + ", ".join(f"{k} {statistics.median(v)*1000:.0f} ms [{min(v)*1000:.0f}-{max(v)*1000:.0f}]" for k, v in ts.items()))

"""VidToMe temporal token merging (Li, Ma, Yang & Yang, "VidToMe", CVPR 2024).

Pure tensor functions. The frames of a video are denoised in chunks (one UNet call per chunk,
batch S*F sample-major for S CFG samples and F frames). In every self-attention of the merged
levels, the tokens of a chunk's frames are joined, the other frames' tokens are merged into one
random target frame ("replace" merge: a merged token takes its destination's value), then merged
with a global token set carried across the chunks of one step; attention runs on the merged
tokens and the output is copied back to every frame (unmerge by copy).

Shapes: x (S*F, N, C) with N = h*w tokens of one frame; joined (S, F*N, C).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Hashable, List, Optional, Tuple

import torch

from .. import kernels
from .matching import normalize_metric, plan_from_matches
from .merge import merge, unmerge
from .partition import derive_seed
from .plan import MergePlan
from .temporal_options import VidToMeOptions


def _generator(*keys) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(derive_seed(*keys))


def chunk_frames(n_frames: int, chunk_size: int, seed: int, step_key=0) -> List[List[int]]:
    """Split frames 0..n_frames-1 into chunks of consecutive frames, in the order to run them.

    The first chunk has a random length in [1, chunk_size] (so chunk seams move every step), the
    rest have chunk_size frames (the last may be shorter); with probability 1/2 the borders are
    mirrored (the short chunk at the end); chunks run in a random order. Seeded by (seed, step).
    Every frame appears in exactly one chunk.
    """
    if n_frames <= 0:
        return []
    gen = _generator(seed, "chunks", step_key)
    first = int(torch.randint(1, chunk_size + 1, (1,), generator=gen))
    sizes = [min(first, n_frames)]
    while sum(sizes) < n_frames:
        sizes.append(min(chunk_size, n_frames - sum(sizes)))
    if int(torch.randint(2, (1,), generator=gen)):
        sizes.reverse()
    chunks, start = [], 0
    for size in sizes:
        chunks.append(list(range(start, start + size)))
        start += size
    order = torch.randperm(len(chunks), generator=gen).tolist()
    return [chunks[i] for i in order]


@dataclass(frozen=True)
class ChunkDraw:
    """The random choices of one chunk in one step, shared by every merged block of the call."""

    target: int  # target frame of the local merge, in [0, F)
    global_is_src: bool  # global set = source side of the global merge (else the local tokens)


def chunk_draw(seed: int, step_key, frames: Tuple[int, ...], global_rand: float) -> ChunkDraw:
    """One seeded draw per (seed, step, chunk frames)."""
    gen = _generator(seed, "draw", step_key, tuple(frames))
    target = int(torch.randint(len(frames), (1,), generator=gen))
    global_is_src = bool(torch.rand((1,), generator=gen).item() < global_rand)
    return ChunkDraw(target, global_is_src)


def replace_plan(
    metric: torch.Tensor, dst_idx: torch.Tensor, src_idx: torch.Tensor, r: int, align_batch: bool = True
) -> MergePlan:
    """Match each source to its most similar destination (cosine); the r best sources merge.

    metric: (S, N, C); dst_idx (D,), src_idx (Ns,) disjoint raster indices covering [0, N).
    align_batch: one map for all S samples (VidToMe's align_batch: each source takes its best
    destination over all samples, ranked by that best score), else one map per sample.
    """
    if not 0 <= r <= src_idx.numel():
        raise ValueError(f"r={r} must be in [0, {src_idx.numel()}] (number of sources)")
    m = normalize_metric(metric)
    score, target = kernels.best_match(m[:, src_idx], m[:, dst_idx])  # (S, Ns)
    return _replace_from_matches(score, target, dst_idx, src_idx, r, metric.shape[1], align_batch)


def _replace_from_matches(score, target, dst_idx, src_idx, r, n_tokens, align_batch) -> MergePlan:
    """score, target: (S, Ns) best similarity and destination position (in dst_idx) per source;
    align_batch: one map for all S samples, each source ranked by its best score over them."""
    if align_batch and score.shape[0] > 1:
        score, which = score.max(dim=0, keepdim=True)
        target = target.gather(0, which)
    return plan_from_matches(score, target, dst_idx, src_idx, r, n_tokens, replace=True)


def local_plan(joined: torch.Tensor, n_frames: int, target: int, ratio: float, align_batch: bool = True) -> MergePlan:
    """Local merge of one chunk: other frames' tokens into the target frame.

    joined: (S, F*N, C) frames joined along tokens; r = floor(ratio * (F-1) * N).
    """
    S, FN, _ = joined.shape
    n = FN // n_frames
    device = joined.device
    lo, hi = target * n, (target + 1) * n
    dst = torch.arange(lo, hi, device=device)
    src = torch.cat([torch.arange(0, lo, device=device), torch.arange(hi, FN, device=device)])
    r = int(ratio * src.numel())
    # normalise once and match the frames before / after the target as views (no gathers)
    m = normalize_metric(joined)
    parts = [kernels.best_match(m[:, a:b], m[:, lo:hi]) for a, b in ((0, lo), (hi, FN)) if b > a]
    score = torch.cat([p[0] for p in parts], 1)
    tgt = torch.cat([p[1] for p in parts], 1)
    return _replace_from_matches(score, tgt, dst, src, r, FN, align_batch)


def global_plan(local: torch.Tensor, glob: torch.Tensor, ratio: float, global_is_src: bool, align_batch: bool = True) -> MergePlan:
    """Global merge of the chunk's local tokens (S, Ml, C) with the carried set (S, Mg, C).

    Acts on cat([local, glob], 1); r = floor(ratio * |source side|).
    """
    ml, mg = local.shape[1], glob.shape[1]
    device = local.device
    local_idx = torch.arange(ml, device=device)
    glob_idx = torch.arange(ml, ml + mg, device=device)
    src, dst = (glob_idx, local_idx) if global_is_src else (local_idx, glob_idx)
    r = int(ratio * src.numel())
    return replace_plan(torch.cat([local, glob], 1), dst, src, r, align_batch)


def temporal_attention(
    x: torch.Tensor,
    n_samples: int,
    attn: Callable[[torch.Tensor], torch.Tensor],
    opts: VidToMeOptions,
    draw: ChunkDraw,
    global_tokens: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Self-attention `attn` of one chunk with VidToMe merging.

    x: (S*F, N, C) sample-major (sample s holds rows s*F .. s*F+F-1); attn: (S, M, C) -> (S, M, C).
    global_tokens: the set carried from earlier chunks of this step, (S, Mg, C), or None.
    Returns (out (S*F, N, C), the new global set (S, Ml, C) or None when global_ratio is 0).
    """
    B, N, C = x.shape
    if n_samples <= 0 or B % n_samples:
        raise ValueError(f"batch {B} is not a multiple of the number of samples {n_samples}")
    S, F = n_samples, B // n_samples
    if not 0 <= draw.target < F:
        raise ValueError(f"target frame {draw.target} is outside the chunk's {F} frames")
    joined = x.reshape(S, F * N, C)
    local = local_plan(joined, F, draw.target, opts.local_ratio, opts.align_batch) if F > 1 else None
    tokens = merge(joined, local) if local is not None else joined
    use_global = opts.global_ratio > 0 and global_tokens is not None and global_tokens.shape[0] == S
    if use_global:
        gplan = global_plan(tokens, global_tokens, opts.global_ratio, draw.global_is_src, opts.align_batch)
        merged = merge(torch.cat([tokens, global_tokens.to(tokens.dtype)], 1), gplan)
        ml = tokens.shape[1]
        local_part = MergePlan(gplan.group[:, :ml], gplan.size, ml, rep=gplan.rep)  # unmerge the local tokens only
        new_global = unmerge(merged, local_part)
        out = unmerge(attn(merged), local_part)
    else:
        new_global = tokens if opts.global_ratio > 0 else None
        out = attn(tokens)
    if local is not None:
        out = unmerge(out, local)
    return out.reshape(B, N, out.shape[-1]), new_global


def step_schedule(n_frames: int, opts: VidToMeOptions, step_key) -> List[Tuple[Tuple[int, ...], ChunkDraw]]:
    """The chunks of one step in the order they run, each with its draw:
    [(frames, chunk_draw(opts.seed, step_key, frames, opts.global_rand)), ...] over
    chunk_frames(n_frames, opts.chunk_size, opts.seed, step_key). Both adapters run this schedule."""
    return [
        (tuple(frames), chunk_draw(opts.seed, step_key, tuple(frames), opts.global_rand))
        for frames in chunk_frames(n_frames, opts.chunk_size, opts.seed, step_key)
    ]


def chunked_temporal_attention(
    x: torch.Tensor,
    n_samples: int,
    attn: Callable[[torch.Tensor], torch.Tensor],
    opts: VidToMeOptions,
    step_key,
) -> torch.Tensor:
    """Self-attention over every frame of a video at once, chunk by chunk, with VidToMe merging.

    x: (S*F, N, C) sample-major (sample s holds its F frames in rows s*F .. s*F+F-1).
    The chunks of ``step_schedule(F, opts, step_key)`` run in order through ``temporal_attention``,
    the global set carried from chunk to chunk. This equals running the denoiser once per chunk
    (``VidToMePolicy.run_step``): outside this attention a UNet mixes nothing across frames, so
    block b of a chunk sees the same global set either way. Returns (S*F, N, C') in the rows of x.
    """
    B = x.shape[0]
    if n_samples <= 0 or B % n_samples:
        raise ValueError(f"batch {B} is not a multiple of the number of samples {n_samples}")
    S, F = n_samples, B // n_samples
    out, global_tokens = None, None
    for frames, draw in step_schedule(F, opts, step_key):
        rows = torch.tensor([s * F + f for s in range(S) for f in frames], device=x.device)
        y, global_tokens = temporal_attention(x.index_select(0, rows), S, attn, opts, draw, global_tokens)
        if out is None:
            out = y.new_empty((B,) + tuple(y.shape[1:]))
        out[rows] = y
    return out


class VidToMePolicy:
    """VidToMe for ``MergeRuntime``. A denoiser call holds either every frame (the ComfyUI adapter:
    ``chunked_attention`` runs the step's chunks inside each attention) or one chunk (the
    diffusers adapter, below).

    ``run_step(n_frames, n_samples, step_key, call)`` runs the step's schedule: for every chunk it
    records the chunk (frames, CFG samples S, draw) and calls ``call(frames)``, which runs the
    denoiser on those frames (batch S*F, sample-major). Inside that call ``attention(block, x,
    attn)`` merges with the chunk's draw and the block's global token set, which is carried from
    chunk to chunk and dropped when the step changes. A call made outside ``run_step`` is one
    chunk of frames 0..F-1 (S = 2 for an even batch, else 1) keyed by the call's own step key.
    """

    def __init__(self, opts: VidToMeOptions):
        self.opts = opts
        self.globals: Dict[Hashable, torch.Tensor] = {}
        self._globals_step = None
        self._declared: Optional[Tuple[Tuple[int, ...], int, object]] = None  # (frames, S, step)
        self.draw: Optional[ChunkDraw] = None
        self.call_samples = 1
        self.merged_calls: Dict[int, int] = {}  # tokens per frame -> attention calls merged

    def run_step(self, n_frames: int, n_samples: int, step_key, call: Callable[[Tuple[int, ...]], None]) -> None:
        """Run ``call(frames)`` for every chunk of ``step_schedule(n_frames, opts, step_key)``."""
        try:
            for frames, _draw in step_schedule(n_frames, self.opts, step_key):
                self.set_chunk(frames, n_samples, step_key)
                call(frames)
        finally:
            self._declared = None

    def set_chunk(self, frames, n_samples: int, step=None) -> None:
        """Declare the next denoiser call by hand: its frames (indices in the video), CFG samples S
        and step key (None: the call's own)."""
        self._declared = (tuple(int(f) for f in frames), int(n_samples), step)

    def begin_call(self, batch: int, step_key) -> None:
        """A denoiser call with `batch` rows at `step_key` starts (from the adapter's pre-hook)."""
        frames, samples, step = self._declared or (None, None, None)
        step = step_key if step is None else step
        if step != self._globals_step:
            self.globals.clear()
            self._globals_step = step
        samples = samples if samples is not None else (2 if batch % 2 == 0 else 1)
        if batch % samples:
            raise ValueError(f"VidToMe: denoiser batch {batch} is not a multiple of the CFG samples {samples}")
        n_frames = batch // samples
        frames = frames if frames is not None and len(frames) == n_frames else tuple(range(n_frames))
        self.call_samples = samples
        self.draw = chunk_draw(self.opts.seed, step, frames, self.opts.global_rand)

    def attention(self, block: Hashable, x: torch.Tensor, attn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Merged self-attention of one block in the current chunk call; x: (S*F, N, C)."""
        out, new_global = temporal_attention(x, self.call_samples, attn, self.opts, self.draw, self.globals.get(block))
        if new_global is not None:
            self.globals[block] = new_global
        self.merged_calls[x.shape[1]] = self.merged_calls.get(x.shape[1], 0) + 1
        return out

    def chunked_attention(self, x: torch.Tensor, n_samples: int, attn, step_key) -> torch.Tensor:
        """Every frame in one denoiser call (the ComfyUI adapter): ``chunked_temporal_attention``."""
        return chunked_temporal_attention(x, n_samples, attn, self.opts, step_key)

    def reset(self) -> None:
        """Forget the global token sets (e.g. between videos)."""
        self.globals.clear()
        self._globals_step = None
        self.draw = None

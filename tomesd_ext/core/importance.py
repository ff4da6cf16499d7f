"""Importance-based token merging (IBTM; Wu, Xu, Le & Samaras, arXiv 2411.16720) as a
destination-selection policy of the ToMe engine.

Importance of a latent pixel = channel mean of |prediction_cond - prediction_uncond| from the
classifier-free-guidance batch (one step stale: the map of step t drives step t+1). Per image:

    r = floor(ratio*N);  N_dst = floor(kk*N), kk = 1/(sx*sy);  M = min(N, floor((N - r)*pp))
    pool = the M most important tokens;  dst = N_dst tokens drawn (seeded) from the pool
    src  = the other tokens; tokens outside the pool get a priority key, so all of them merge
           before any important source (which merges only when it is among the most similar).

Deviation from the paper (documented in docs/importance.md): the destination draw is stratified
by sx x sy windows inside the pool (one random pool token per window first, the remaining
budget uniformly from the rest of the pool), so at low ratios where the pool is the whole image
the partition is exactly ToMe's random window partition instead of an unstratified draw.
Matching (cosine of the block's metric) is the unchanged engine (`bipartite_plan`).

Video token grids (frames, h, w; the diffusers video transformers): the clip splits into slabs of
st frames (the last one shallower when st does not divide frames), the windows of ToMe's video
partition (``window_partition``); each slab is partitioned as an image whose windows are
st x sy x sx (its own pool of the most important tokens, one destination per window first), so
every slab keeps destinations and a source always reaches one within ``frame_reach >= st - 1``.
Matching is ToMe's video matching (``bipartite_plan`` on the (frames, h, w) grid, frame_reach).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .matching import bipartite_plan
from .partition import derive_seed, timestep_key, window_partition
from .plan import MergePlan
from .tome import tome_plan

# Added to the similarity of tokens outside the pool. Cosine scores lie in [-1, 1], so any key
# > 2 orders "unimportant first, then by similarity"; a small key keeps float32 resolution of
# the similarity (the paper's 1e5 would round scores to ~0.008).
UNIMPORTANT_PRIORITY = 4.0


def importance_map(pred: torch.Tensor, layout: str = "halves") -> torch.Tensor:
    """Channel-mean |pred_cond - pred_uncond| per latent pixel.

    pred: (2*B0, C, H, W) denoiser output of a CFG batch, or (2*B0, C, F, H, W) of a video
    (epsilon, v or flow; a learned-sigma output is the caller's to slice). layout: "halves"
    ([uncond..., cond...] or the reverse: the absolute difference does not depend on which half is
    which) or "interleaved" ([u0, c0, u1, c1, ...]). Returns (B0, H, W) (video: (B0, F, H, W)) float32.
    An AnimateDiff clip batch is such a video: one map per clip frame, cond and uncond of the same
    frame paired.
    """
    if pred.ndim not in (4, 5) or pred.shape[0] % 2:
        raise ValueError(f"pred must be (2*B0, C, H, W) or (2*B0, C, F, H, W) with an even batch, got {tuple(pred.shape)}")
    if layout == "halves":
        a, b = pred.chunk(2)
    elif layout == "interleaved":
        a, b = pred[0::2], pred[1::2]
    else:
        raise ValueError(f"layout={layout!r}: use 'halves' or 'interleaved'")
    return (b.float() - a.float()).abs().mean(dim=1)


def pool_to_grid(hmap: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Area-average a (B0, H, W) map to an h x w token grid -> (B0, h*w), row-major.

    The grid is a UNet level with downsample factor d = 2**k: h = ceil(H/d), w = ceil(W/d) (odd
    sizes included). Token (i, j) averages the latent pixels [i*d, (i+1)*d) x [j*d, (j+1)*d) that exist;
    partial cells at the bottom/right edge average only their real pixels.
    """
    B0, H, W = hmap.shape
    if (h, w) == (H, W):
        return hmap.reshape(B0, H * W).float()
    d = 2
    while d <= max(H, W) and (-(-H // d), -(-W // d)) != (h, w):
        d *= 2
    if (-(-H // d), -(-W // d)) != (h, w):
        raise ValueError(f"grid {h}x{w} is not a downsampled level (factor 2**k) of a {H}x{W} map")
    pad = (0, w * d - W, 0, h * d - H)
    total = torch.nn.functional.pad(hmap.float(), pad).reshape(B0, h, d, w, d).sum(dim=(2, 4))
    ones = torch.nn.functional.pad(torch.ones(1, H, W, device=hmap.device), pad)
    count = ones.reshape(1, h, d, w, d).sum(dim=(2, 4))
    return (total / count).reshape(B0, h * w)


def pool_to_video_grid(hmap: torch.Tensor, frames: int, h: int, w: int) -> torch.Tensor:
    """Area-average a (B0, F, H, W) video map to its frames x h x w token grid -> (B0, frames, h, w).

    A token covers a patch of (F // frames, H // h, W // w) latent pixels (a patch embedding drops
    the trailing pixels that fill no patch, so they are dropped here too)."""
    B0, F, H, W = hmap.shape
    if not (frames <= F and h <= H and w <= W):
        raise ValueError(f"token grid {frames}x{h}x{w} does not fit a {F}x{H}x{W} map")
    pt, ph, pw = F // frames, H // h, W // w
    cells = hmap[:, : frames * pt, : h * ph, : w * pw].float().reshape(B0, frames, pt, h, ph, w, pw)
    return cells.mean(dim=(2, 4, 6))


def max_importance_ratio(sx: int, sy: int, pool_factor: float) -> float:
    """Largest ratio the partition allows: r <= N - N_dst and M >= N_dst (kk = 1/(sx*sy))."""
    kk = 1.0 / (sx * sy)
    return min(1.0 - kk, 1.0 - kk / pool_factor)


@dataclass
class ImportancePartition:
    """The partition of one image: dst (D,), src (S,) raster indices, priority (S,) float32,
    r sources to merge, and the pool size M (M == N: degenerate regime, nothing forced)."""

    dst: torch.Tensor
    src: torch.Tensor
    priority: torch.Tensor
    r: int
    pool: int


def partition_counts(n: int, ratio: float, sx: int, sy: int, pool_factor: float, depth: int = 1):
    """(r, N_dst, M) for N tokens; M is raised to N_dst and r capped at N - N_dst on tiny grids
    where the floors would break the ratio limits. depth: frames per window (a video slab)."""
    n_dst = n // (depth * sx * sy)
    r = min(int(ratio * n), n - n_dst)
    m = max(n_dst, min(n, math.floor((n - r) * pool_factor + 1e-9)))
    return r, n_dst, m


def importance_partitions(
    importance: torch.Tensor,
    h: int,
    w: int,
    ratio: float,
    sx: int,
    sy: int,
    pool_factor: float,
    seed: int,
    stratify: bool = True,
    frames: int = 1,
    st: int = 1,
) -> list:
    """One ImportancePartition per image. importance: (B0, frames*h*w) pooled map (frame-major,
    then row-major, as ``window_partition``).

    The draw uses a CPU generator seeded with `seed` (a (B0, N) uniform key), so the partition
    is a function of (map, seed) only. stratify=False draws dst uniformly from the pool, as the
    paper's code does. A video (frames > 1) is partitioned per slab of st frames (module
    docstring); r counts the whole clip, and ``pool`` is the summed pool size.
    """
    B0, n = importance.shape
    if n != frames * h * w:
        raise ValueError(f"importance has {n} tokens, grid {frames}x{h}x{w} has {frames * h * w}")
    st = st if frames > 1 else 1
    device = importance.device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    u = torch.rand(B0, n, generator=gen).to(device)
    in_pool = torch.zeros(B0, n, dtype=torch.bool, device=device)
    is_dst = torch.zeros(B0, n, dtype=torch.bool, device=device)
    plane, n_dst_all, pool = h * w, 0, 0
    for f0 in range(0, frames, st):
        depth = min(st, frames - f0)
        lo, hi = f0 * plane, (f0 + depth) * plane
        _r, n_dst, m = partition_counts(hi - lo, ratio, sx, sy, pool_factor, depth)
        slab_pool, slab_dst = _slab_partition(importance[:, lo:hi], u[:, lo:hi], h, w, sx, sy, depth, n_dst, m, stratify)
        in_pool[:, lo:hi], is_dst[:, lo:hi] = slab_pool, slab_dst
        n_dst_all, pool = n_dst_all + n_dst, pool + m
    r = partition_counts(n, ratio, sx, sy, pool_factor)[0] if frames == 1 else min(int(ratio * n), n - n_dst_all)
    # ascending raster order without a host sync: stable sort of the mask puts src (0) first
    split = is_dst.to(torch.uint8).argsort(dim=1, stable=True)
    src, dst = split[:, : n - n_dst_all], split[:, n - n_dst_all :]
    priority = torch.where(in_pool.gather(1, src), 0.0, UNIMPORTANT_PRIORITY).float()
    return [ImportancePartition(dst[b], src[b], priority[b], r, pool) for b in range(B0)]


def _slab_partition(importance, u, h, w, sx, sy, depth, n_dst, m, stratify):
    """(in_pool, is_dst) (B0, depth*h*w) bool of one slab (an image: depth 1): the m most
    important tokens form the pool, n_dst of them drawn (key u) as destinations."""
    B0, n = importance.shape
    device = importance.device
    order = importance.float().argsort(dim=1, descending=True, stable=True)
    in_pool = torch.zeros(B0, n, dtype=torch.bool, device=device)
    in_pool.scatter_(1, order[:, :m], True)
    # tiers: 0 first pool token of a full window (depth x sy x sx), 1 of a partial edge window,
    # 2 any other pool token, 3 outside the pool (never a destination since M >= N_dst).
    key = u.clone()
    if stratify:
        rows = torch.arange(h, device=device).view(-1, 1) // sy
        cols = torch.arange(w, device=device).view(1, -1) // sx
        n_wx = -(-w // sx)
        window = (rows * n_wx + cols).flatten().repeat(depth).expand(B0, n)
        full = (((rows + 1) * sy <= h) & ((cols + 1) * sx <= w)).flatten().repeat(depth)
        pool_u = torch.where(in_pool, u, torch.full_like(u, 2.0))
        first = torch.full((B0, -(-h // sy) * n_wx), 2.0, device=device)
        first = first.scatter_reduce(1, window, pool_u, reduce="amin")
        is_first = in_pool & (pool_u == first.gather(1, window))
        tier = torch.where(is_first, torch.where(full, 0.0, 1.0), 2.0)
        key = key + 2.0 * tier
    key = torch.where(in_pool, key, torch.full_like(key, 8.0))
    chosen = key.argsort(dim=1, stable=True)[:, :n_dst]
    is_dst = torch.zeros(B0, n, dtype=torch.bool, device=device).scatter_(1, chosen, True)
    return in_pool, is_dst


def image_rows(batch: int, layout: str, images: Optional[int] = None, frames: int = 1) -> list:
    """Row indices of each image in a CFG batch of `batch` rows: halves -> [i, B0 + i],
    interleaved -> [2i, 2i + 1] (CPU tensors; move them to the metric's device once).

    images: B0 for a batch of k = batch / B0 chunks of B0 rows each ("halves" only: ComfyUI's
    cond/uncond chunks, any k and order) -> image i = rows [i, B0 + i, 2*B0 + i, ...].
    frames: F > 1 for a batch of clips run frame by frame (rows c*F .. c*F + F - 1 are the frames
    of clip c, the clips in the CFG layout): image i*F + f = frame f of the cond and uncond clips
    of pair i, the order of ``importance_map`` of a clip batch.
    """
    if frames > 1:
        clips = image_rows(batch // frames, layout, images)
        return [c * frames + f for c in clips for f in range(frames)]
    b0 = images or batch // 2
    if layout == "halves":
        return [torch.arange(i, batch, b0) for i in range(b0)]
    return [torch.arange(2 * i, 2 * i + 2) for i in range(b0)]


def importance_plan(metric: torch.Tensor, parts: list, rows: list, grid, frame_reach: Optional[int] = None) -> Optional[MergePlan]:
    """Merge plan for metric (B, N, C); rows[i] (k,) are the rows of image i (e.g. its uncond
    and cond rows), parts[i] its partition. grid: (h, w), or (frames, h, w) of a video, whose
    sources then match destinations at most frame_reach frames away (None: any frame).

    Every row of an image uses that image's partition and priority; matching is per row, as in
    ToMe. Returns None when nothing is merged.
    """
    B, n, _ = metric.shape
    if not parts or parts[0].r == 0 or parts[0].dst.numel() == 0:
        return None
    reach = frame_reach if len(grid) == 3 else None
    if len(parts) == 1:
        p = parts[0]
        return bipartite_plan(metric, p.dst, p.src, p.r, p.priority.expand(B, -1), grid, reach)
    group = torch.empty(B, n, dtype=torch.long, device=metric.device)
    size = None
    for p, idx in zip(parts, rows):
        sub = bipartite_plan(metric[idx], p.dst, p.src, p.r, p.priority.expand(idx.numel(), -1), grid, reach)
        if size is None:
            size = torch.empty(B, sub.n_groups, device=metric.device)
        group[idx] = sub.group
        size[idx] = sub.size
    return MergePlan(group, size, n, grid)


def with_prune_weights(plan: MergePlan, dst: torch.Tensor) -> MergePlan:
    """The same plan as a "prune" plan (paper sec. 5.4): merged sources get weight 0, so a group
    takes its destination's value (sources are dropped, not averaged) and unmerge copies it back.

    dst: (B, D) or (D,) destination raster indices of each row (groups 0..D-1 are theirs).
    """
    D = dst.shape[-1]
    dst = dst.expand(plan.batch, D)
    weight = (plan.group >= D).float().scatter_(1, dst, 1.0)
    return MergePlan(plan.group, plan.size, plan.n_tokens, plan.grid, weight, anchor=plan.anchor)


NO_CFG_WARNING = (
    "tomesd-ext importance mode: the denoiser batch is not a classifier-free-guidance pair "
    "(cfg = 1 or guidance_scale <= 1, a guidance-distilled model, or another batch layout), so there is no "
    "importance map; merging with ToMe's random window partition instead"
)


def detect_cfg_layout(sample: torch.Tensor, setting: str = "auto") -> Optional[str]:
    """The CFG layout of a denoiser input (B, C, H, W) or clip batch (B, C, F, H, W): "halves",
    "interleaved" or None.

    CFG pipelines call the denoiser on the latents twice over, so the two rows of an image are
    bit-identical: halves equal -> "halves"; rows 2i, 2i+1 equal -> "interleaved"; neither -> no
    CFG batch. setting: "auto" (detect), "halves"/"interleaved" (forced for an even batch), "off".
    """
    if setting == "off" or sample is None or sample.ndim not in (4, 5):
        return None
    B = sample.shape[0]
    if B < 2 or B % 2:
        return None
    if setting != "auto":
        return setting
    a, b = sample.chunk(2)
    if torch.equal(a, b):
        return "halves"
    if torch.equal(sample[0::2], sample[1::2]):
        return "interleaved"
    return None


def read_call(sample: Optional[torch.Tensor], timestep, setting: str = "auto") -> Tuple[float, Optional[str]]:
    """(timestep key, CFG layout) of a denoiser call: ``timestep_key(timestep)`` and
    ``detect_cfg_layout(sample, setting)`` with their values read from the device in one go, so an
    importance-mode call waits for the device once (the key alone: timestep_key)."""
    if setting != "auto" or not isinstance(sample, torch.Tensor) or sample.ndim not in (4, 5):
        return timestep_key(timestep), detect_cfg_layout(sample, setting)
    if sample.shape[0] < 2 or sample.shape[0] % 2:
        return timestep_key(timestep), None
    a, b = sample.chunk(2)
    values = [(a == b).all(), (sample[0::2] == sample[1::2]).all()]
    read_t = isinstance(timestep, torch.Tensor) and timestep.numel() > 0
    if read_t:
        values.append(timestep.detach().flatten()[0].to(sample.device))
    exact = torch.float32 if sample.device.type == "mps" else torch.float64  # MPS has no float64
    got = torch.stack([v.to(exact) for v in values]).tolist()
    layout = "halves" if got[0] else "interleaved" if got[1] else None
    return timestep_key(got[2] if read_t else timestep), layout


def importance_map_from_x0(cond: torch.Tensor, uncond: torch.Tensor, sigma) -> torch.Tensor:
    """The map from x0 predictions (B0, C, H, W) of the cond and uncond passes at noise level sigma
    ((B0,) or a number > 0): for an epsilon model x0 = x - sigma * eps, so
    mean_c |cond - uncond| / sigma = mean_c |eps_cond - eps_uncond| (for v/flow models a per-step
    multiple of the prediction difference: the same ranking). Returns (B0, H, W) float32."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=cond.device).flatten()
    hmap = importance_map(torch.cat([uncond, cond]), "halves")
    return hmap / sigma.view(-1, *(1,) * (hmap.ndim - 1))


def shared_token_map(hmap: torch.Tensor, grid=None, keep_first_frame: bool = False) -> torch.Tensor:
    """The map of a CFG step for a transformer, whose plans the call's batch shares: the mean over
    the step's images of ``hmap``, (1, ...).

    hmap (B0, H, W): an image; grid (h, w) area-pools it to that token grid (``pool_to_grid``, a
    patch size 2**k), None keeps the latent size (the policy pools it per call).
    hmap (B0, F, H, W): a video; grid (frames, h, w) its token grid (``pool_to_video_grid``), less
    the first frame when keep_first_frame holds it back, (1, h, w) when one frame is left."""
    mean = hmap.float().mean(0, keepdim=True)
    if hmap.ndim == 3:
        return mean if grid is None else pool_to_grid(mean, *grid).view(1, *grid)
    if hmap.ndim != 4 or grid is None or len(grid) != 3:
        raise ValueError(f"a video map (B0, F, H, W) needs its token grid (frames, h, w), got {tuple(hmap.shape)}, {grid}")
    mean = pool_to_video_grid(mean, *grid)
    if keep_first_frame:
        mean = mean[:, 1:]
    return mean[:, 0] if mean.shape[1] == 1 else mean


class ImportancePolicy:
    """The importance-mode policy of one patched denoiser (``MergeRuntime``), shared by the
    diffusers and ComfyUI adapters (they differ only in where the map comes from and how the CFG
    batch is laid out).

    Per denoiser call the runtime calls ``on_call(step_key)`` and the adapter ``use_map(rows, batch,
    hw)``; after a CFG step the adapter stores the map with ``set_map(hmap (B0, H, W), step_key)``
    (``importance_map`` / ``importance_map_from_x0``; a video transformer's map at its merged token
    grid, (B0, frames, h, w), ``pool_to_video_grid``) or drops it with ``no_map(warn)``. ``plan`` is
    the importance partition of the map of the previous step, or ToMe's window plan when there is
    none (step 0, no CFG, another batch or size); the first ``opts.prune_steps`` steps of a run
    prune instead of merging. ``counts`` records which policy planned each block call.
    """

    def __init__(self, opts):
        self.opts = opts
        self.hmap: Optional[torch.Tensor] = None  # (B0, H, W) (video: (B0, frames, h, w)) of the last CFG step
        self.hmap_step: Optional[float] = None
        self.active: Optional[torch.Tensor] = None  # the map used by the call in progress
        self.batch = 0
        self.rows: list = []  # row indices of each image in the call's batch
        self.parts = {}  # (h, w) -> partitions of the call in progress
        self.counts = {"importance": 0, "tome": 0}
        self.step_index = 0  # steps since the run started (prune phase)
        self.step_key = 0.0
        self.last_step: Optional[float] = None
        self.warned = False
        self._rows_cache = {}
        self._one_row = [torch.zeros(1, dtype=torch.long)]

    def on_call(self, step_key: float) -> None:
        self.advance(step_key)

    def advance(self, step_key: float) -> None:
        """Start a denoiser call at `step_key` (the timestep): a larger key than the last call's
        starts a new run (step_index 0), a smaller one is the next step, an equal one is another
        call of the same step (e.g. ComfyUI running cond and uncond separately)."""
        if self.last_step is None or step_key > self.last_step:
            self.step_index = 0
        elif step_key < self.last_step:
            self.step_index += 1
        self.last_step = self.step_key = step_key
        self.parts = {}
        self.active = None

    def use_map(self, rows: list, batch: int, hw) -> None:
        """Use the stored map for this call if it fits: rows[i] (k,) are image i's rows of the
        `batch`, hw = (H, W) the latent size (a video: its merged token grid); the map must have
        len(rows) images of that size and come from this run (its step key not below the current one)."""
        self.rows, self.batch = rows, batch
        if self._map_fits(len(rows), hw):
            self.active = self.hmap

    def use_shared_map(self, hw) -> None:
        """``use_map`` for a transformer call, whose plans its batch shares (one metric row, the
        mean over its rows): the stored ``shared_token_map`` when it has size hw."""
        self.use_map(self._one_row, 1, hw)

    def use_clip_map(self, layout: str, clips: int, frames: int, hw, device, images: Optional[int] = None,
                     frame_idx=None) -> None:
        """``use_map`` for a call of `clips` clips of `frames` frames in CFG `layout` (AnimateDiff;
        the stored map has one map per clip frame, ``importance_map`` of a clip batch).

        opts.frame_plan "shared": the runtime plans on clip metrics (one row per clip), so the
        images are the clip pairs and each map is the mean of the clip's frame maps; "per-frame":
        the images are the clip frames, cond and uncond rows of the same frame paired.
        images: the distinct clips when the call's clips are chunks repeating them (``image_rows``;
        ComfyUI: one clip, a chunk per cond/uncond entry); None: clips // 2 CFG pairs.
        frame_idx: the frames of each stored clip map this call runs (a context window of a longer
        clip: the stored map has every frame of it); None: all of them, `frames` per clip."""
        per_frame = self.opts.frame_plan == "per-frame"
        batch = clips * frames if per_frame else clips
        self.rows = self.image_rows(batch, layout, device, images=images, frames=frames if per_frame else 1)
        self.batch = batch
        maps = self._clip_maps(len(self.rows) // (frames if per_frame else 1), frames, hw, frame_idx)
        if maps is not None:
            if per_frame:  # the stored map itself when the call runs all its frames
                self.active = self.hmap if frame_idx is None else maps.flatten(0, 1)
            else:
                self.active = maps.mean(dim=1)

    def _clip_maps(self, clips: int, frames: int, hw, frame_idx) -> Optional[torch.Tensor]:
        """The stored map as (clips, frames, H, W) for this call (frame_idx: its frames of each
        stored clip), or None when it does not fit (another size, clip count or run)."""
        prev = self.hmap
        if prev is None or prev.ndim != 3 or tuple(prev.shape[1:]) != tuple(hw) or self.step_key > self.hmap_step:
            return None
        if clips < 1 or prev.shape[0] % clips:
            return None
        maps = prev.view(clips, -1, *hw)
        if frame_idx is not None:
            frame_idx = [int(i) for i in frame_idx]
            if not frame_idx or min(frame_idx) < 0 or max(frame_idx) >= maps.shape[1]:
                return None
            maps = maps[:, frame_idx]
        return maps if maps.shape[1] == frames else None

    def _map_fits(self, images: int, hw) -> bool:
        prev = self.hmap
        return prev is not None and tuple(prev.shape) == (images, *hw) and self.step_key <= self.hmap_step

    def set_map(self, hmap: Optional[torch.Tensor], step_key: Optional[float] = None) -> None:
        """Store the map of a finished CFG step (None drops it)."""
        self.hmap = hmap
        self.hmap_step = self.step_key if step_key is None else step_key

    def no_map(self, warn) -> None:
        """Drop the map of a call that was no CFG pair; ``warn(NO_CFG_WARNING)`` the first time."""
        if not self.warned:
            warn(NO_CFG_WARNING)
            self.warned = True
        self.set_map(None)

    def image_rows(self, batch: int, layout: str, device, images: Optional[int] = None, frames: int = 1) -> list:
        """``image_rows(batch, layout, images, frames)`` on `device`, cached for the last batch layout."""
        key = (batch, layout, images, device, frames)
        if key not in self._rows_cache:
            self._rows_cache = {key: [r.to(device) for r in image_rows(batch, layout, images, frames)]}
        return self._rows_cache[key]

    def plan(self, metric: torch.Tensor, h: int, w: int, seed: Optional[int], frames: int = 1, partition=None) -> Optional[MergePlan]:
        """metric (B, N, C) of a level with an h x w grid (a video: frames x h x w, whose map the
        adapter stored at that token grid, (B0, frames, h, w)) -> the block call's plan.
        partition: ToMe's (dst, src) drawn already for this call (the fallback uses it)."""
        opts = self.opts
        prune = self.step_index < opts.prune_steps
        grid = (frames, h, w) if frames > 1 else (h, w)
        active = self.active
        if active is not None and frames > 1 and tuple(active.shape[1:]) != grid:
            active = None
        if active is None or metric.shape[0] != self.batch:
            self.counts["tome"] += 1
            plan = tome_plan(metric, h, w, opts, seed, frames, partition)
            if plan is not None and prune:
                st = opts.st if frames > 1 else 1
                dst = partition[0] if partition is not None else window_partition(h, w, opts.sx, opts.sy, seed, metric.device, frames, st)[0]
                plan = with_prune_weights(plan, dst)
            return plan
        parts = self.parts.get(grid)
        if parts is None:
            pooled = active.reshape(active.shape[0], -1).float() if frames > 1 else pool_to_grid(active, h, w)
            key = derive_seed(opts.seed, "importance", self.step_key, *grid)
            parts = importance_partitions(pooled, h, w, opts.ratio, opts.sx, opts.sy, opts.pool_factor, key,
                                          frames=frames, st=opts.st)
            self.parts[grid] = parts
        self.counts["importance"] += 1
        plan = importance_plan(metric, parts, self.rows, grid, opts.frame_reach)
        if plan is not None and prune:
            dst = torch.empty(metric.shape[0], parts[0].dst.numel(), dtype=torch.long, device=metric.device)
            for p, idx in zip(parts, self.rows):
                dst[idx] = p.dst
            plan = with_prune_weights(plan, dst)
        return plan

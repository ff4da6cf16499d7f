"""Temporal consistency: flow-based warp error between consecutive output frames.

Optical flow (OpenCV Farneback) is computed on the INPUT video, so the measure asks "does the
edit move the way the input moves". For each pair (t, t+1): the backward flow from frame t+1 to
frame t warps output t onto frame t+1; pixels whose flow leaves the image or fails the
forward-backward consistency check (occlusions) are masked out. The warp error of the pair is the
mean squared RGB difference (values in [0, 1]) over the valid pixels (Lai et al. 2018, as used
by VidToMe); the video's warp error is the mean over pairs.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np

from .io import _cv2


def farneback_flows(frames: Sequence[np.ndarray]) -> List[Tuple[np.ndarray, np.ndarray]]:
    """(backward flow t+1 -> t, forward flow t -> t+1) for every consecutive pair; each (H, W, 2)."""
    cv2 = _cv2()
    gray = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]
    args = dict(pyr_scale=0.5, levels=3, winsize=15, iterations=3, poly_n=5, poly_sigma=1.2, flags=0)
    out = []
    for a, b in zip(gray[:-1], gray[1:]):
        back = cv2.calcOpticalFlowFarneback(b, a, None, **args)
        fwd = cv2.calcOpticalFlowFarneback(a, b, None, **args)
        out.append((back, fwd))
    return out


def _sample(img: np.ndarray, mapx: np.ndarray, mapy: np.ndarray) -> np.ndarray:
    cv2 = _cv2()
    return cv2.remap(img, mapx, mapy, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def pair_warp_error(prev: np.ndarray, nxt: np.ndarray, back: np.ndarray, fwd: np.ndarray) -> float:
    """Warp error of one output pair (RGB uint8) given the input flows of that pair."""
    h, w = back.shape[:2]
    gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    mapx, mapy = gx + back[..., 0], gy + back[..., 1]
    inside = (mapx >= 0) & (mapx <= w - 1) & (mapy >= 0) & (mapy <= h - 1)
    fwd_at = _sample(fwd, mapx, mapy)  # forward flow at the matched point of frame t
    loop = back + fwd_at
    mag = (back**2).sum(-1) + (fwd_at**2).sum(-1)
    consistent = (loop**2).sum(-1) <= 0.01 * mag + 0.5
    valid = inside & consistent
    if not valid.any():
        return float("nan")
    warped = _sample(prev.astype(np.float32) / 255.0, mapx, mapy)
    diff = ((warped - nxt.astype(np.float32) / 255.0) ** 2).mean(-1)
    return float(diff[valid].mean())


def warp_error(outputs: Sequence[np.ndarray], inputs: Sequence[np.ndarray]) -> float:
    """Mean warp error of `outputs` along the flow of `inputs` (same length and size). NaN for 1 frame."""
    if len(outputs) != len(inputs):
        raise ValueError(f"{len(outputs)} output frames vs {len(inputs)} input frames")
    if len(outputs) < 2:
        return float("nan")
    if outputs[0].shape[:2] != inputs[0].shape[:2]:
        raise ValueError(f"output size {outputs[0].shape[:2]} differs from input size {inputs[0].shape[:2]}")
    errs = [pair_warp_error(a, b, back, fwd) for (a, b), (back, fwd) in zip(zip(outputs[:-1], outputs[1:]), farneback_flows(inputs))]
    errs = [e for e in errs if np.isfinite(e)]
    return float(np.mean(errs)) if errs else float("nan")


def frame_difference(x) -> float:
    """Relative frame-to-frame change of a per-frame tensor x (F, ...) such as a noise prediction:
    mean over consecutive pairs of ||x[t+1] - x[t]||^2, divided by the mean ||x[t]||^2.
    Flow-free (static pixels only agree when the frames agree there); NaN for one frame."""
    import torch

    x = torch.as_tensor(x).float()
    if x.shape[0] < 2:
        return float("nan")
    return float((x[1:] - x[:-1]).pow(2).mean() / x.pow(2).mean().clamp_min(1e-30))

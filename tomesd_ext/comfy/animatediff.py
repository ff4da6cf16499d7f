"""The clip layout of a UNet call that ComfyUI-AnimateDiff-Evolved animates (its motion modules
injected into the UNet, sampling through its "Use Evolved Sampling").

AnimateDiff-Evolved samples a latent batch of N frames as one clip. Its sampling function puts
``ad_params`` into ``transformer_options`` (a dict it documents as stable for other extensions):
``full_length`` N, ``context_length`` and ``sub_idxs``, the frames of the context window the call
runs (None without context windows: all N). ComfyUI then concatenates the call's cond/uncond chunks
(``cond_or_uncond``), each holding the window's F frames in order, so rows c*F .. c*F + F - 1 are
the frames of one clip, the layout AnimateDiff's motion modules reshape to (chunks x h x w, F, C).

``clip_call(x, transformer_options)`` reads that layout for ``MergeRuntime.begin_call(clip_frames=F)``
and for importance mode (which frames of the stored per-frame map this window uses). Nothing here
imports AnimateDiff-Evolved: a call without ``ad_params`` is an ordinary image batch.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional

AD_PARAMS = "ad_params"


class ClipCall(NamedTuple):
    """A UNet call of AnimateDiff frames: ``chunks`` copies (cond/uncond) of one clip of ``frames``
    rows; ``frame_idx`` the clip's frames it runs (positions in the full clip of ``full_length``)."""

    chunks: int
    frames: int
    frame_idx: List[int]
    full_length: int


def clip_call(x, transformer_options) -> Optional[ClipCall]:
    """The clip layout of this UNet call (x: its (B, C, H, W) latent), or None when the call is
    not AnimateDiff-Evolved's or its rows do not split into whole windows."""
    ad = (transformer_options or {}).get(AD_PARAMS)
    chunks = len((transformer_options or {}).get("cond_or_uncond") or ())
    if not isinstance(ad, dict) or chunks == 0 or x is None or x.ndim != 4 or x.shape[0] % chunks:
        return None
    frames = x.shape[0] // chunks
    full = ad.get("full_length")
    sub = ad.get("sub_idxs")
    try:
        full = int(full)
        idx = list(range(full)) if sub is None else [int(i) for i in sub]
    except (TypeError, ValueError):
        return None
    if len(idx) != frames or any(not 0 <= i < full for i in idx):
        return None
    return ClipCall(chunks, frames, idx, full)

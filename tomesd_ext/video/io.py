"""Video input/output with OpenCV: mp4 (any container OpenCV reads), animated GIF, folders of frames.

Frames are RGB uint8 arrays (H, W, 3). Writers are atomic: they write to a temporary name in
the destination folder and rename it into place, so a crash never leaves a half-written file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
DEFAULT_FPS = 8.0


class VideoInputError(ValueError):
    """The input cannot be read or selects no frames; the message says which and why."""


def _cv2():
    try:
        import cv2
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("video support needs OpenCV: pip install 'tomesd-ext[video]'") from e
    return cv2


@dataclass
class Clip:
    """frames: list of RGB uint8 (H, W, 3); fps of the source (DEFAULT_FPS when unknown)."""

    frames: List[np.ndarray]
    fps: float
    source: str
    note: str = ""


def read_frames(
    path: Union[str, Path], start: int = 0, end: Optional[int] = None, stride: int = 1, max_frames: Optional[int] = None
) -> Clip:
    """Read frames start, start+stride, ... < end (end None = to the last), at most max_frames."""
    cv2 = _cv2()
    p = Path(path)
    if not p.exists():
        raise VideoInputError(f"input {str(p)!r} does not exist")
    if start < 0 or stride < 1 or (end is not None and end < 0) or (max_frames is not None and max_frames < 1):
        raise VideoInputError(f"bad frame selection start={start} end={end} stride={stride} max_frames={max_frames}")
    wanted = lambda i: i >= start and (i - start) % stride == 0 and (end is None or i < end)  # noqa: E731
    frames, fps = [], DEFAULT_FPS
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise VideoInputError(f"folder {str(p)!r} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
        for i, f in enumerate(files):
            if not wanted(i):
                continue
            img = cv2.imread(str(f), cv2.IMREAD_COLOR)
            if img is None:
                raise VideoInputError(f"cannot read image {str(f)!r} (corrupt or unsupported)")
            frames.append(cv2.cvtColor(img, cv2.COLOR_BGR2RGB))
            if max_frames and len(frames) >= max_frames:
                break
    else:
        cap = cv2.VideoCapture(str(p))
        if not cap.isOpened():
            raise VideoInputError(f"cannot open video {str(p)!r} (corrupt or unsupported format)")
        fps = cap.get(cv2.CAP_PROP_FPS) or DEFAULT_FPS
        i = 0
        while True:
            ok, img = cap.read()
            if not ok:
                break
            if wanted(i):
                frames.append(cv2.cvtColor(img, cv2.COLOR_BGR2RGB))
                if max_frames and len(frames) >= max_frames:
                    break
            if end is not None and i >= end:
                break
            i += 1
        cap.release()
        if i == 0 and not frames:
            raise VideoInputError(f"video {str(p)!r} has no readable frames (corrupt or empty)")
    if not frames:
        raise VideoInputError(f"{str(p)!r}: the selection start={start} end={end} stride={stride} selects zero frames")
    shapes = {f.shape for f in frames}
    if len(shapes) > 1:
        raise VideoInputError(f"{str(p)!r}: frames differ in size {sorted(shapes)}")
    if not np.isfinite(fps) or fps <= 0 or fps > 1000:
        fps = DEFAULT_FPS
    return Clip(frames, float(fps), str(p))


def fit_size(frames: Sequence[np.ndarray], size=None, multiple: int = 8) -> Tuple[List[np.ndarray], str]:
    """Resize to cover `size` ((W, H), an int for the short side, or None = keep) then centre-crop
    to a multiple of `multiple`. Returns (frames, a note saying what was done, or "")."""
    cv2 = _cv2()
    h0, w0 = frames[0].shape[:2]
    if size is None:
        tw, th = w0, h0
    elif isinstance(size, int):
        scale = size / min(w0, h0)
        tw, th = round(w0 * scale), round(h0 * scale)
    else:
        tw, th = int(size[0]), int(size[1])
    tw, th = max(multiple, tw // multiple * multiple), max(multiple, th // multiple * multiple)
    if (tw, th) == (w0, h0):
        return list(frames), ""
    scale = max(tw / w0, th / h0)
    rw, rh = max(tw, round(w0 * scale)), max(th, round(h0 * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    x0, y0 = (rw - tw) // 2, (rh - th) // 2
    out = [cv2.resize(f, (rw, rh), interpolation=interp)[y0 : y0 + th, x0 : x0 + tw] for f in frames]
    note = f"resized {w0}x{h0} -> {rw}x{rh} and centre-cropped to {tw}x{th} (multiple of {multiple})"
    return out, note


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_mp4(frames: Sequence[np.ndarray], path: Union[str, Path], fps: float) -> Path:
    """Write RGB frames as an mp4 (OpenCV, codec mp4v) atomically."""
    cv2 = _cv2()
    path = Path(path)
    tmp = _tmp_name(path).with_suffix(".mp4")
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), float(fps), (w, h))
    if not writer.isOpened():
        raise OSError(f"OpenCV cannot write an mp4 at {str(path)!r}")
    try:
        for f in frames:
            writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    finally:
        writer.release()
    os.replace(tmp, path)
    return path


def write_frames(frames: Sequence[np.ndarray], folder: Union[str, Path]) -> Path:
    """Write frames as folder/0000.png ... (PNG via OpenCV)."""
    cv2 = _cv2()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(frames):
        if not cv2.imwrite(str(folder / f"{i:04d}.png"), cv2.cvtColor(f, cv2.COLOR_RGB2BGR)):
            raise OSError(f"cannot write {str(folder / f'{i:04d}.png')!r}")
    return folder

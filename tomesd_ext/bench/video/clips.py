"""The clips of the video bench: skimage's animated GIF, the synthetic moving shapes, or a file."""

from __future__ import annotations

import os


def gif_path() -> str:
    """The animated GIF scikit-image ships (24 frames of 25 x 14 px)."""
    import skimage

    return os.path.join(os.path.dirname(skimage.__file__), "data", "no_time_for_that_tiny.gif")


def load_clip(spec: str, n: int, size: int):
    """(name, frames, note): up to n frames, each an (H, W, 3) uint8 array with short side `size`
    (fit_size); note says how the frames were resized or cropped ("" when not)."""
    from ...video import fit_size, moving_shapes, read_frames

    if spec == "shapes":
        return "shapes (synthetic)", fit_size(moving_shapes(n, size), size)[0], ""
    if spec == "gif":
        path, name = gif_path(), "skimage no_time_for_that_tiny.gif"
    else:
        path, name = spec, spec
    clip = read_frames(path, max_frames=n)
    frames, note = fit_size(clip.frames, size)
    return name, frames, note

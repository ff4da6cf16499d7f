"""Video adapter: IO (OpenCV), the zero-shot editing pipeline (DDIM inversion / SDEdit, optional
ControlNet), VidToMe or per-frame attention, warp error, and batch jobs."""

from .editor import EditSettings, VideoEditor, canny_images
from .io import Clip, VideoInputError, fit_size, read_frames, write_frames, write_mp4
from .synthetic import moving_shapes
from .warp import farneback_flows, frame_difference, warp_error

__all__ = [
    "Clip",
    "EditSettings",
    "VideoEditor",
    "VideoInputError",
    "canny_images",
    "farneback_flows",
    "fit_size",
    "frame_difference",
    "moving_shapes",
    "read_frames",
    "warp_error",
    "write_frames",
    "write_mp4",
]

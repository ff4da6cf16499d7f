"""OpenCV IO (mp4, gif, folders), size fitting, and the warp error."""

import os

import numpy as np
import pytest

from tomesd_ext.video import VideoInputError, fit_size, moving_shapes, read_frames, warp_error, write_frames, write_mp4


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    frames = moving_shapes(6, 64)
    write_mp4(frames, d / "clip.mp4", 8)
    write_frames(frames, d / "frames")
    (d / "corrupt.mp4").write_bytes(b"not a video" * 50)
    (d / "empty").mkdir()
    return d, frames


def test_read_mp4_folder_and_selection(clip_files):
    d, frames = clip_files
    mp4 = read_frames(d / "clip.mp4")
    assert len(mp4.frames) == 6 and mp4.frames[0].shape == (64, 64, 3) and mp4.fps == pytest.approx(8)
    folder = read_frames(d / "frames", start=1, end=5, stride=2)
    assert len(folder.frames) == 2
    assert np.array_equal(folder.frames[0], frames[1])  # PNG is lossless
    assert len(read_frames(d / "clip.mp4", max_frames=3).frames) == 3
    assert not [f for f in os.listdir(d) if ".tmp-" in f]  # atomic writers leave no temp files


def test_read_skimage_gif():
    import skimage

    path = os.path.join(os.path.dirname(skimage.__file__), "data", "no_time_for_that_tiny.gif")
    clip = read_frames(path)
    assert len(clip.frames) > 8 and clip.frames[0].ndim == 3


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("missing.mp4", {}, "does not exist"),
        ("corrupt.mp4", {}, "corrupt"),
        ("empty", {}, "no image files"),
        ("clip.mp4", {"start": 50}, "zero frames"),
        ("clip.mp4", {"stride": 0}, "bad frame selection"),
    ],
)
def test_bad_inputs(clip_files, name, kwargs, match):
    d, _ = clip_files
    with pytest.raises(VideoInputError, match=match):
        read_frames(d / name, **kwargs)


def test_fit_size_multiple_of_8_and_says_so():
    frames = [np.zeros((25, 14, 3), np.uint8)]
    out, note = fit_size(frames, 64)
    assert out[0].shape[0] % 8 == 0 and out[0].shape[1] == 64
    assert "multiple of 8" in note
    out, note = fit_size([np.zeros((64, 48, 3), np.uint8)], None)
    assert out[0].shape == (64, 48, 3) and note == ""
    out, _ = fit_size([np.zeros((100, 100, 3), np.uint8)], (60, 36))
    assert out[0].shape == (32, 56, 3)


def test_warp_error_follows_input_motion():
    frames = moving_shapes(5, 96)
    assert warp_error(frames, frames) < 1e-3  # the input warps onto itself
    rng = np.random.default_rng(0)
    noisy = [np.clip(f.astype(int) + rng.integers(-60, 60, f.shape), 0, 255).astype(np.uint8) for f in frames]
    assert warp_error(noisy, frames) > 10 * warp_error(frames, frames)
    still = [frames[0]] * 5  # an output that ignores the motion is penalised
    assert warp_error(still, frames) > warp_error(frames, frames)
    with pytest.raises(ValueError):
        warp_error(frames[:3], frames)

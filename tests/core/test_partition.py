import pytest
import torch

from tomesd_ext.core import window_partition

from reference import ref_partition


@pytest.mark.parametrize("h,w,sx,sy", [(4, 4, 2, 2), (7, 5, 2, 2), (65, 97, 2, 2), (6, 9, 3, 2), (1, 8, 2, 2)])
def test_top_left_matches_reference(h, w, sx, sy):
    dst, src = window_partition(h, w, sx, sy, None)
    ref_dst, ref_src = ref_partition(h, w, sx, sy, None)
    assert dst.tolist() == ref_dst
    assert src.tolist() == ref_src


@pytest.mark.parametrize("h,w", [(8, 8), (9, 7), (65, 97)])
def test_random_partition_one_per_window_and_edges_are_sources(h, w):
    sx, sy = 2, 2
    dst, src = window_partition(h, w, sx, sy, seed=123)
    assert dst.numel() == (h // sy) * (w // sx)
    assert sorted(dst.tolist() + src.tolist()) == list(range(h * w))
    rows, cols = dst // w, dst % w
    windows = set(zip((rows // sy).tolist(), (cols // sx).tolist()))
    assert len(windows) == dst.numel()  # exactly one destination per window
    assert (rows < (h // sy) * sy).all() and (cols < (w // sx) * sx).all()  # edge tokens never dst
    assert torch.equal(dst, dst.sort().values) and torch.equal(src, src.sort().values)


def test_seeded_partition_is_deterministic_and_seed_dependent():
    a = window_partition(16, 16, 2, 2, seed=7)[0]
    b = window_partition(16, 16, 2, 2, seed=7)[0]
    c = window_partition(16, 16, 2, 2, seed=8)[0]
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_random_offsets_cover_whole_window():
    dst = window_partition(64, 64, 2, 2, seed=1)[0]
    offsets = (dst // 64 % 2) * 2 + dst % 64 % 2
    assert set(offsets.tolist()) == {0, 1, 2, 3}


def test_grid_smaller_than_window_has_no_destinations():
    dst, src = window_partition(1, 5, 2, 2, seed=0)
    assert dst.numel() == 0 and src.numel() == 5

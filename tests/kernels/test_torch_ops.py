"""The exact torch path against slow loop references (CPU)."""

import pytest
import torch

from tomesd_ext.kernels import csr, torch_ops
from tomesd_ext import kernels

from kernel_reference import random_plan_groups, ref_best_match, ref_merge, ref_unmerge, unit


@pytest.mark.parametrize("S,D,C", [(7, 5, 3), (13, 4, 8), (1, 1, 2)])
def test_best_match_matches_loops(S, D, C):
    g = torch.Generator().manual_seed(S * 100 + D)
    src, dst = unit(torch.randn(2, S, C, generator=g)), unit(torch.randn(2, D, C, generator=g))
    score, index = kernels.best_match(src, dst)
    rs, ri = ref_best_match(src, dst)
    assert torch.equal(index, ri)
    torch.testing.assert_close(score.double(), rs, atol=1e-6, rtol=0)
    assert score.dtype == torch.float32 and index.dtype == torch.long


def test_best_match_ties_lowest_index_also_when_chunked(monkeypatch):
    # duplicated destinations tie exactly: the lowest index must win, chunked or not
    base = unit(torch.randn(1, 3, 4, generator=torch.Generator().manual_seed(0)))
    dst = torch.cat([base, base, base], 1)  # rows d, d+3, d+6 identical
    src = base.repeat(1, 5, 1)
    _, index = kernels.best_match(src, dst)
    assert index.tolist() == [[0, 1, 2] * 5]
    monkeypatch.setattr(torch_ops, "SCORE_CHUNK_BYTES", 1)  # one row per chunk
    _, index_chunked = kernels.best_match(src, dst)
    assert torch.equal(index, index_chunked)


def test_best_match_chunked_equals_unchunked(monkeypatch):
    g = torch.Generator().manual_seed(3)
    src, dst = unit(torch.randn(3, 37, 16, generator=g)), unit(torch.randn(3, 11, 16, generator=g))
    full = kernels.best_match(src, dst)
    monkeypatch.setattr(torch_ops, "SCORE_CHUNK_BYTES", 3 * 11 * 4 * 5)  # 5 rows per chunk
    chunked = kernels.best_match(src, dst)
    # the GEMM may block differently per chunk size: scores agree to rounding, matches exactly
    assert torch.equal(full[1], chunked[1])
    torch.testing.assert_close(full[0], chunked[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("reduce", ["max", "mean"])
def test_best_match_aligned_matches_loops(reduce, monkeypatch):
    g = torch.Generator().manual_seed(5)
    src, dst = unit(torch.randn(4, 9, 6, generator=g)), unit(torch.randn(4, 5, 6, generator=g))
    monkeypatch.setattr(torch_ops, "SCORE_CHUNK_BYTES", 4 * 5 * 4 * 2)
    score, index = kernels.best_match_aligned(src, dst, groups=2, reduce=reduce)
    rs, ri = ref_best_match(src, dst, groups=2, reduce=reduce)
    assert score.shape == (2, 9)
    assert torch.equal(index, ri)
    torch.testing.assert_close(score.double(), rs, atol=1e-6, rtol=0)


def test_best_match_aligned_one_group_is_best_match():
    g = torch.Generator().manual_seed(6)
    src, dst = unit(torch.randn(2, 9, 6, generator=g)), unit(torch.randn(2, 5, 6, generator=g))
    a, b = kernels.best_match_aligned(src, dst, groups=1), kernels.best_match(src, dst)
    assert torch.equal(a[1], b[1])
    torch.testing.assert_close(a[0], b[0])


def test_best_match_aligned_rejects_bad_arguments():
    x = torch.randn(3, 4, 2)
    with pytest.raises(ValueError, match="multiple of groups"):
        kernels.best_match_aligned(x, x, groups=2)
    with pytest.raises(ValueError, match="reduce"):
        kernels.best_match_aligned(x, x, groups=1, reduce="sum")


def test_best_match_to_frame():
    g = torch.Generator().manual_seed(7)
    frames = unit(torch.randn(2, 4, 6, 5, generator=g))  # B=2, F=4, N=6
    score, index = kernels.best_match_to_frame(frames, target=2)
    src = torch.cat([frames[:, 0], frames[:, 1], frames[:, 3]], 1)
    rs, ri = ref_best_match(src, frames[:, 2])
    assert score.shape == (2, 18) and torch.equal(index, ri)
    s2, i2 = kernels.best_match_to_frame(frames, target=-2, groups=2)
    rs2, ri2 = ref_best_match(src, frames[:, 2], groups=2)
    assert s2.shape == (1, 18) and torch.equal(i2, ri2)
    with pytest.raises(ValueError, match="target"):
        kernels.best_match_to_frame(frames, target=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("weighted", [False, True])
def test_merge_mean_matches_loops(dtype, weighted):
    g = torch.Generator().manual_seed(11)
    B, N, M, C = 2, 23, 9, 5
    x = torch.randn(B, N, C, generator=g).to(dtype)
    group = random_plan_groups(B, N, M, g)
    weight = torch.rand(B, N, generator=g) if weighted else None
    w = weight if weighted else torch.ones(B, N)
    size = torch.zeros(B, M).scatter_add_(1, group, w)
    out = kernels.merge_mean(x, group, size, weight)
    assert out.dtype == dtype and out.shape == (B, M, C)
    tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(out.double(), ref_merge(x, group, size, weight), atol=tol, rtol=tol)


def test_unmerge_gather_matches_loops():
    g = torch.Generator().manual_seed(12)
    y = torch.randn(2, 6, 3, generator=g)
    group = random_plan_groups(2, 17, 6, g)
    assert torch.equal(kernels.unmerge_gather(y, group), ref_unmerge(y, group))


def test_csr_layout_and_cache():
    g = torch.Generator().manual_seed(13)
    group = random_plan_groups(3, 20, 7, g)
    order, offsets = csr.group_csr(group, 7)
    for b in range(3):
        for m in range(7):
            members = order[b, offsets[b, m] : offsets[b, m + 1]].tolist()
            assert members == [n for n in range(20) if group[b, n] == m]  # ascending token order
    assert csr.group_csr(group, 7)[0] is order  # cached
    group[0, 0] = (group[0, 0] + 1) % 7  # in-place change bumps the version: recomputed
    assert csr.group_csr(group, 7)[0] is not order

"""CUDA kernels against the torch path and the loop references (need a GPU and the extension).

Matches must agree up to ties: where the CUDA index differs from the reference, the reference
score of the CUDA choice must be within the dtype's rounding of the best score.
Run on a GPU machine with: TOMESD_EXT_KERNELS=cuda pytest tests/kernels/test_cuda_parity.py
"""

import pytest
import torch

from tomesd_ext import kernels
from tomesd_ext.kernels import dispatch, torch_ops

from kernel_reference import random_plan_groups, ref_merge, unit

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: CUDA-vs-torch parity needs a GPU")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# score tolerance for "same match up to ties": fp32 accumulation of products of rounded inputs
TIE_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture
def ext():
    module = kernels.extension(required=True)
    assert module is not None
    return module


def exact_scores(src, dst, groups=1, reduce="max"):
    """float64 (b, S, D) scores of the rounded inputs (the CUDA kernel's arithmetic, exactly)."""
    s = torch.bmm(src.double(), dst.double().transpose(1, 2))
    B = s.shape[0]
    s = s.view(groups, B // groups, *s.shape[1:])
    return s.amax(0) if reduce == "max" else s.mean(0)


def check_match(src, dst, score, index, groups=1, reduce="max"):
    exact = exact_scores(src, dst, groups, reduce)
    best = exact.max(-1).values
    chosen = exact.gather(-1, index.unsqueeze(-1)).squeeze(-1)
    tol = TIE_TOL[src.dtype]
    assert (best - chosen).abs().max().item() <= tol, "a CUDA match is worse than the best beyond ties"
    torch.testing.assert_close(score.double(), best, atol=tol, rtol=0)
    ref_score, ref_index = torch_ops.best_match_aligned(src, dst, groups, reduce)
    agree = (ref_index == index).float().mean().item()
    assert agree > {torch.float32: 0.999, torch.float16: 0.95, torch.bfloat16: 0.85}[src.dtype], f"only {agree:.4f} of matches agree with torch"


SHAPES = [  # (B, S, D, C): odd sizes exercise every tile edge; 1536/512 are SD-like levels
    (1, 1, 1, 1),
    (2, 65, 63, 17),
    (2, 3 * 97 * 65 // 4, 97 * 65 // 4, 320),  # a 65x97 grid (520x776 image), 2x2 windows
    (2, 1536, 512, 640),
    (3, 200, 130, 40),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tensor_cores", [True, False])
def test_best_match_parity(ext, dtype, shape, tensor_cores, monkeypatch):
    monkeypatch.setattr(dispatch, "TENSOR_CORES", tensor_cores)
    B, S, D, C = shape
    g = torch.Generator(device="cuda").manual_seed(S * 7 + D)
    src = unit(torch.randn(B, S, C, device="cuda", generator=g)).to(dtype)
    dst = unit(torch.randn(B, D, C, device="cuda", generator=g)).to(dtype)
    score, index = kernels.best_match(src, dst)
    assert score.dtype == torch.float32 and index.dtype == torch.long and score.shape == (B, S)
    check_match(src, dst, score, index)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tensor_cores", [True, False])
def test_ties_resolve_to_lowest_index(ext, dtype, tensor_cores, monkeypatch):
    monkeypatch.setattr(dispatch, "TENSOR_CORES", tensor_cores)
    base = unit(torch.randn(1, 70, 48, device="cuda")).to(dtype)
    dst = torch.cat([base, base, base], 1)  # destination d, d+70, d+140 identical (crosses tiles)
    _, index = kernels.best_match(base, dst)
    ref_index = torch_ops.best_match(base, dst)[1]
    exact = exact_scores(base, dst)
    top = exact.max(-1).values.unsqueeze(-1)
    lowest = (exact == top).float().argmax(-1)  # first exact maximum
    assert torch.equal(index, lowest)
    assert (index < 70).all()
    if dtype == torch.float32:
        assert torch.equal(index, ref_index)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduce", ["max", "mean"])
@pytest.mark.parametrize("tensor_cores", [True, False])
def test_aligned_and_frame_matching_parity(ext, dtype, reduce, tensor_cores, monkeypatch):
    monkeypatch.setattr(dispatch, "TENSOR_CORES", tensor_cores)
    frames = unit(torch.randn(4, 4, 24 * 17, 64, device="cuda")).to(dtype)  # CFG 2 x 2 videos, 4 frames
    score, index = kernels.best_match_to_frame(frames, target=1, groups=2, reduce=reduce)
    src = torch.cat([frames[:, :1], frames[:, 2:]], 1).reshape(4, -1, 64)
    assert score.shape == (2, 3 * 24 * 17)
    check_match(src, frames[:, 1], score, index, groups=2, reduce=reduce)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 4096, 2048, 320), (2, 65 * 97, 3000, 7), (3, 101, 50, 33)])
def test_merge_unmerge_parity(ext, dtype, weighted, shape):
    B, N, M, C = shape
    cpu = torch.Generator().manual_seed(N)
    group = random_plan_groups(B, N, M, cpu).cuda()
    x = torch.randn(B, N, C, device="cuda").to(dtype)
    weight = torch.rand(B, N, device="cuda") if weighted else None
    w = weight if weighted else torch.ones(B, N, device="cuda")
    size = torch.zeros(B, M, device="cuda").scatter_add_(1, group, w)
    out = kernels.merge_mean(x, group, size, weight)
    ref = torch_ops.merge_mean(x, group, size, weight)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    assert out.dtype == dtype and out.shape == (B, M, C)
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    if N <= 101:
        torch.testing.assert_close(out.double().cpu(), ref_merge(x.cpu(), group.cpu(), size.cpu(), None if weight is None else weight.cpu()), atol=tol, rtol=tol)
    assert torch.equal(kernels.merge_mean(x, group, size, weight), out)  # deterministic
    back = kernels.unmerge_gather(out, group)
    assert torch.equal(back, torch_ops.unmerge_gather(out, group))
    odd = out[:, :, : max(1, C - 1)]  # non-contiguous rows, odd byte widths
    assert torch.equal(kernels.unmerge_gather(odd, group), torch_ops.unmerge_gather(odd.contiguous(), group))


@pytest.mark.parametrize("dtype", DTYPES)
def test_full_plan_parity(ext, dtype):
    """bipartite_plan + merge + unmerge on an odd grid: CUDA vs torch kernels, same plan up to ties."""
    from tomesd_ext.core import ToMeOptions, merge, tome_plan, unmerge

    opts = ToMeOptions.create(ratio=0.5, seed=1)
    h, w = 65, 97
    x = torch.randn(2, h * w, 320, device="cuda").to(dtype)
    plan_cuda = tome_plan(x, h, w, opts, seed=3)
    y_cuda = unmerge(merge(x, plan_cuda), plan_cuda)
    import os

    os.environ["TOMESD_EXT_KERNELS"] = "torch"
    try:
        kernels.reset()
        plan_torch = tome_plan(x, h, w, opts, seed=3)
        y_torch = unmerge(merge(x, plan_torch), plan_torch)
    finally:
        del os.environ["TOMESD_EXT_KERNELS"]
        kernels.reset()
    same = (plan_cuda.group == plan_torch.group).float().mean().item()
    assert same > (0.999 if dtype == torch.float32 else 0.97)
    err = (y_cuda.float() - y_torch.float()).norm() / y_torch.float().norm()
    assert err < (1e-4 if dtype == torch.float32 else 0.05)

"""Importance map, pooling and the importance partition policy (core/importance.py)."""

import warnings

import pytest
import torch

from tomesd_ext.core import OptionError, ToMeOptions, merge, unmerge, window_partition
from tomesd_ext.core.importance import (
    UNIMPORTANT_PRIORITY,
    image_rows,
    importance_map,
    importance_partitions,
    importance_plan,
    max_importance_ratio,
    partition_counts,
    importance_map_from_x0,
    pool_to_grid,
    shared_token_map,
    with_prune_weights,
)


# --- map ---------------------------------------------------------------------------------


def test_map_is_channel_mean_abs_difference_per_image():
    torch.manual_seed(0)
    uncond, cond = torch.randn(3, 4, 5, 7), torch.randn(3, 4, 5, 7)
    ref = (cond - uncond).abs().mean(1)
    halves = importance_map(torch.cat([uncond, cond]), "halves")
    assert halves.shape == (3, 5, 7)
    torch.testing.assert_close(halves, ref)
    # the order of the halves does not matter: |a - b| == |b - a|
    torch.testing.assert_close(importance_map(torch.cat([cond, uncond]), "halves"), ref)
    inter = torch.stack([uncond, cond], 1).flatten(0, 1)  # u0 c0 u1 c1 ...
    torch.testing.assert_close(importance_map(inter, "interleaved"), ref)


def test_map_fp16_input_gives_float32():
    x = torch.randn(2, 4, 3, 3).half()
    assert importance_map(x).dtype == torch.float32


def test_map_rejects_odd_batch():
    with pytest.raises(ValueError, match="even batch"):
        importance_map(torch.randn(3, 4, 2, 2))


# --- pooling -------------------------------------------------------------------------------


@pytest.mark.parametrize("H,W", [(8, 8), (7, 9), (5, 3), (13, 1)])
@pytest.mark.parametrize("d", [1, 2, 4])
def test_pool_matches_loop_reference(H, W, d):
    torch.manual_seed(H * W + d)
    hmap = torch.rand(2, H, W)
    h, w = -(-H // d), -(-W // d)
    pooled = pool_to_grid(hmap, h, w)
    assert pooled.shape == (2, h * w)
    ref = torch.empty(2, h, w)
    for i in range(h):
        for j in range(w):
            ref[:, i, j] = hmap[:, i * d : (i + 1) * d, j * d : (j + 1) * d].mean(dim=(1, 2))
    torch.testing.assert_close(pooled, ref.reshape(2, -1))


def test_map_from_x0_of_a_video_divides_each_image_by_its_sigma():
    g = torch.Generator().manual_seed(0)
    x, v_c, v_u = (torch.randn(2, 3, 4, 5, 6, generator=g) for _ in range(3))
    sigma = torch.tensor([0.5, 0.25])
    s = sigma.view(2, 1, 1, 1, 1)
    got = importance_map_from_x0(x - s * v_c, x - s * v_u, sigma)
    assert got.shape == (2, 4, 5, 6)
    torch.testing.assert_close(got, (v_c - v_u).abs().mean(1), rtol=1e-5, atol=1e-5)


def test_shared_token_map_of_images_and_videos():
    g = torch.Generator().manual_seed(0)
    img = torch.rand(3, 7, 10, generator=g)  # an odd latent: ceil-padded 4 x 5 token grid
    mean = img.mean(0, keepdim=True)
    assert torch.equal(shared_token_map(img), mean)  # no grid: the latent size
    assert torch.equal(shared_token_map(img, (4, 5)), pool_to_grid(mean, 4, 5).view(1, 4, 5))
    vid = torch.rand(2, 3, 4, 6, generator=g)
    full = vid.mean(0, keepdim=True).reshape(1, 3, 2, 2, 3, 2).mean(dim=(3, 5))  # 2x2 patches
    torch.testing.assert_close(shared_token_map(vid, (3, 2, 3)), full)
    torch.testing.assert_close(shared_token_map(vid, (3, 2, 3), keep_first_frame=True), full[:, 1:])
    torch.testing.assert_close(shared_token_map(vid[:, :2], (2, 2, 3), keep_first_frame=True), full[:, 1])  # one frame left
    with pytest.raises(ValueError, match="token grid"):
        shared_token_map(vid, (2, 3))


def test_pool_rejects_a_grid_that_is_no_level():
    with pytest.raises(ValueError, match="not a downsampled level"):
        pool_to_grid(torch.rand(1, 8, 8), 3, 4)


# --- counts and ratio range ----------------------------------------------------------------


def test_counts_follow_the_paper_worked_example():
    # SD 2 at 768^2: N = 9216, ratio 0.7, pp 1.4 -> r 6451, N_dst 2304, M 3871 (IBTM, Wu et al., arXiv 2411.16720)
    assert partition_counts(9216, 0.7, 2, 2, 1.4) == (6451, 2304, 3871)


def test_max_ratio():
    assert max_importance_ratio(2, 2, 1.4) == pytest.approx(0.75)
    assert max_importance_ratio(2, 2, 0.5) == pytest.approx(0.5)


def test_ratio_above_the_pool_limit_warns_with_the_maximum():
    with pytest.warns(UserWarning, match=r"ratio=0.6 exceeds the maximum 0.5 .*pool_factor=0.5"):
        o = ToMeOptions.create(ratio=0.6, mode="importance", pool_factor=0.5, seed=0)
    assert o.ratio == 0.5
    with pytest.warns(UserWarning, match=r"maximum 0.75 \(one destination per 2x2 window"):
        ToMeOptions.create(ratio=0.8, mode="importance", pool_factor=1.4, seed=0)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"mode": "fast"}, "mode='fast' is not allowed"),
        ({"mode": "importance", "pool_factor": 0.2}, r"pool_factor=0.2 is out of range: allowed \[0.5, 4.0\]"),
        ({"mode": "importance", "pool_factor": "big"}, "pool_factor must be a number"),
        ({"mode": "importance", "cfg_layout": "sideways"}, "cfg_layout='sideways' is not allowed"),
    ],
)
def test_bad_importance_options(kwargs, match):
    with pytest.raises(OptionError, match=match):
        ToMeOptions.create(seed=0, **kwargs)


def test_tome_mode_ignores_pool_factor():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ToMeOptions.create(ratio=0.7, pool_factor=0.5, seed=0).ratio == 0.7


# --- partition -----------------------------------------------------------------------------


def _planted(h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, h * w, generator=g)


@pytest.mark.parametrize("h,w", [(8, 8), (9, 7), (6, 10)])
@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.7, 0.75])
def test_partition_structure(h, w, ratio):
    imp = _planted(h, w)
    (p,) = importance_partitions(imp, h, w, ratio, 2, 2, 1.4, seed=3)
    n = h * w
    r, n_dst, m = partition_counts(n, ratio, 2, 2, 1.4)
    assert p.dst.numel() == n_dst and p.src.numel() == n - n_dst and p.r == r and p.pool == m
    assert torch.cat([p.dst, p.src]).sort().values.equal(torch.arange(n))
    top = set(imp[0].argsort(descending=True)[:m].tolist())
    assert set(p.dst.tolist()) <= top  # destinations come from the pool
    outside = (p.priority == UNIMPORTANT_PRIORITY).nonzero().flatten()
    assert set(p.src[outside].tolist()) == set(range(n)) - top
    assert r >= n - m  # every token outside the pool can be merged


@pytest.mark.parametrize("ratio", [0.5, 0.7])
def test_planted_top_tokens_are_never_merged_away(ratio):
    """pool_factor 1: the pool is exactly the N - r kept tokens, so every merge is unimportant."""
    h, w = 12, 10
    imp = _planted(h, w, 1)
    parts = importance_partitions(imp, h, w, ratio, 2, 2, 1.0, seed=5)
    torch.manual_seed(0)
    metric = torch.randn(2, h * w, 8)  # the cond and uncond rows of one image
    plan = importance_plan(metric, parts, image_rows(2, "halves"), (h, w))
    r = parts[0].r
    top = set(imp[0].argsort(descending=True)[: h * w - r].tolist())
    dst = set(parts[0].dst.tolist())
    for b in range(2):
        group = plan.group[b]
        owners = {}
        for i in dst:
            owners[int(group[i])] = i
        for i in range(h * w):
            is_merged_away = int(group[i]) in owners and owners[int(group[i])] != i
            if i in top:
                assert not is_merged_away, f"important token {i} merged away"
        assert plan.n_groups == h * w - r


def test_unimportant_tokens_merge_first_then_by_similarity():
    """pool_factor 1.4: all tokens outside the pool merge; important sources fill the rest."""
    h, w = 8, 8
    imp = _planted(h, w, 2)
    (p,) = importance_partitions(imp, h, w, 0.7, 2, 2, 1.4, seed=1)
    metric = torch.randn(1, h * w, 8)
    plan = importance_plan(metric, [p], [torch.arange(1)], (h, w))
    kept_src = set(p.src[(plan.group[0, p.src] >= p.dst.numel())].tolist())
    unimportant = set(p.src[p.priority > 0].tolist())
    assert not (kept_src & unimportant)
    assert len(kept_src) == p.src.numel() - p.r


def test_degenerate_low_ratio_equals_tome_stratification():
    """ratio <= 1 - 1/pp: the pool is the whole image; the draw is one random token per 2x2
    window (as ToMe's partition), no priority, so nothing is forced."""
    h, w = 8, 12
    (p,) = importance_partitions(_planted(h, w), h, w, 0.25, 2, 2, 1.4, seed=9)
    assert p.pool == h * w
    assert not p.priority.any()
    windows = ((p.dst // w) // 2) * (w // 2) + (p.dst % w) // 2
    assert sorted(windows.tolist()) == list(range((h // 2) * (w // 2)))
    # same structure as ToMe's window partition of the same grid
    tome_dst, _ = window_partition(h, w, 2, 2, seed=9)
    assert tome_dst.numel() == p.dst.numel()


def test_unstratified_draw_can_cluster():
    """The paper's uniform draw (stratify=False) ignores windows; ours fills each window first."""
    h, w = 16, 16
    imp = torch.ones(1, h * w)
    clustered = 0
    for seed in range(5):
        (p,) = importance_partitions(imp, h, w, 0.2, 2, 2, 1.4, seed=seed, stratify=False)
        windows = ((p.dst // w) // 2) * (w // 2) + (p.dst % w) // 2
        clustered += len(windows.unique()) < p.dst.numel()
    assert clustered > 0


def test_partition_is_deterministic_and_seeded():
    imp = _planted(9, 11).repeat(2, 1)
    a = importance_partitions(imp, 9, 11, 0.5, 2, 2, 1.4, seed=7)
    b = importance_partitions(imp, 9, 11, 0.5, 2, 2, 1.4, seed=7)
    c = importance_partitions(imp, 9, 11, 0.5, 2, 2, 1.4, seed=8)
    assert all(x.dst.equal(y.dst) for x, y in zip(a, b))
    assert any(not x.dst.equal(y.dst) for x, y in zip(a, c))


def test_several_images_get_their_own_partition_shared_by_their_rows():
    h, w = 8, 8
    imp = torch.stack([_planted(h, w, 1)[0], _planted(h, w, 2)[0]])
    parts = importance_partitions(imp, h, w, 0.7, 2, 2, 1.0, seed=0)
    assert not parts[0].dst.equal(parts[1].dst)
    torch.manual_seed(0)
    metric = torch.randn(4, h * w, 8)  # halves layout: rows u0 u1 c0 c1
    assert [r.tolist() for r in image_rows(4, "halves")] == [[0, 2], [1, 3]]
    assert [r.tolist() for r in image_rows(4, "interleaved")] == [[0, 1], [2, 3]]
    plan = importance_plan(metric, parts, image_rows(4, "halves"), (h, w))
    for row in range(4):
        p = parts[row % 2]
        # this row's destinations own groups 0..D-1 in order
        assert plan.group[row, p.dst].equal(torch.arange(p.dst.numel()))
        single = importance_plan(metric[row : row + 1], [p], [torch.arange(1)], (h, w))
        assert plan.group[row].equal(single.group[0])
    x = torch.randn(4, h * w, 16)
    y = merge(x, plan)
    assert y.shape == (4, h * w - parts[0].r, 16)
    assert unmerge(y, plan).shape == x.shape


def test_nothing_to_merge_gives_no_plan():
    parts = importance_partitions(_planted(4, 4), 4, 4, 0.0, 2, 2, 1.4, seed=0)
    assert importance_plan(torch.randn(2, 16, 4), parts, image_rows(2, "halves"), (4, 4)) is None


# --- prune phase ---------------------------------------------------------------------------


def test_prune_plan_drops_sources_and_copies_back():
    h, w = 8, 8
    parts = importance_partitions(_planted(h, w), h, w, 0.5, 2, 2, 1.4, seed=0)
    torch.manual_seed(1)
    metric = torch.randn(2, h * w, 8)
    plan = importance_plan(metric, parts, image_rows(2, "halves"), (h, w))
    pruned = with_prune_weights(plan, parts[0].dst)
    x = torch.randn(4, h * w, 6)  # a batch twice the plan's (reuse)
    y = merge(x, pruned)
    dst = parts[0].dst
    D = dst.numel()
    torch.testing.assert_close(y[:, :D], x[:, dst])  # destinations keep their own value
    back = unmerge(y, pruned)
    for b in range(4):
        group = plan.group[b % 2]
        merged_src = [i for i in parts[0].src.tolist() if group[i] < D]
        assert len(merged_src) == parts[0].r
        for i in merged_src:  # a dropped source receives its destination's output
            torch.testing.assert_close(back[b, i], x[b, dst[group[i]]])
        kept = [i for i in parts[0].src.tolist() if group[i] >= D]
        torch.testing.assert_close(back[b, kept], x[b, kept])
    with pytest.raises(ValueError, match="do not compose"):
        pruned.compose(pruned)


def test_prune_steps_option():
    assert ToMeOptions.create(mode="importance", prune_steps=2, seed=0).prune_steps == 2
    with pytest.raises(OptionError, match="applies to mode='importance' only"):
        ToMeOptions.create(prune_steps=2, seed=0)
    with pytest.raises(OptionError, match=r"prune_steps=-1 is out of range"):
        ToMeOptions.create(mode="importance", prune_steps=-1, seed=0)

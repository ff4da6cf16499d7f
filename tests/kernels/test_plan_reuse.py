"""Plan reuse (apply_tome reuse="level" / reuse_steps=k) on a tiny SD-topology UNet (CPU)."""

import pytest
import torch

from tomesd_ext.core import OptionError, PlanCache, ToMeOptions
from tomesd_ext.core import tome as tome_module
from tomesd_ext.diffusers import apply_tome, remove_tome
from tomesd_ext.diffusers import discovery
from tomesd_ext.diffusers import tome as patch_module

pytest.importorskip("diffusers")


def tiny_unet():
    """The SD1.5-topology tiny UNet, self-attention sharpened so merging changes the output."""
    from tomesd_ext.models import build_unet, sharpen_self_attention

    return sharpen_self_attention(build_unet("tiny", seed=0)).eval()


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


@pytest.fixture(scope="module")
def base(unet):
    return run(unet)


def run(unet, t=500, seed=1, hw=(15, 13)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, *hw, generator=g)
    ctx = torch.randn(2, 5, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=ctx).sample


@pytest.fixture
def counted(monkeypatch):
    """Record every plan computed (tome_plan calls) with the metric it was computed from."""
    calls = []
    real = tome_module.tome_plan

    def counting(metric, *a, **k):
        plan = real(metric, *a, **k)
        calls.append(plan)
        return plan

    monkeypatch.setattr("tomesd_ext.core.tome.tome_plan", counting)
    return calls


def level_blocks(unet):
    """Transformer blocks at full resolution (the level merged with max_downsample="auto")."""
    return len(list(discovery.transformer_blocks(unet.down_blocks[0]))) + len(
        list(discovery.transformer_blocks(unet.up_blocks[-1]))
    )


def seen_plans(monkeypatch):
    """Plans that reached merge() (identity), in call order."""
    seen = []
    import tomesd_ext.diffusers.processors as proc

    real_merge = proc.merge

    def spy(x, plan, *a, **k):
        seen.append(plan)
        return real_merge(x, plan, *a, **k)

    monkeypatch.setattr(proc, "merge", spy)
    return seen


def test_options_validated():
    assert ToMeOptions.create(reuse="level", reuse_steps=3).reuses_plans
    assert not ToMeOptions.create().reuses_plans
    with pytest.raises(OptionError, match=r"reuse='layer' is not allowed: use one of \('block', 'level'\)"):
        ToMeOptions.create(reuse="layer")
    with pytest.raises(OptionError, match=r"reuse_steps=0 is out of range: allowed \[1, 1000\]"):
        ToMeOptions.create(reuse_steps=0)
    with pytest.raises(OptionError, match="reuse_steps must be an int"):
        ToMeOptions.create(reuse_steps=1.5)


def test_block_reuse_is_per_block_matching(unet, counted, monkeypatch):
    seen = seen_plans(monkeypatch)
    apply_tome(unet, ratio=0.5, seed=0, min_tokens=0)
    try:
        run(unet)
    finally:
        remove_tome(unet)
    n = level_blocks(unet)
    assert n >= 3 and len(counted) == n and len(seen) == n
    assert len({id(p) for p in seen}) == n


def test_level_reuse_one_plan_for_all_blocks_of_the_level(unet, counted, monkeypatch):
    seen = seen_plans(monkeypatch)
    apply_tome(unet, ratio=0.5, seed=0, min_tokens=0, reuse="level")
    try:
        run(unet)
        assert len(counted) == 1  # the first block of the level computed it
        assert len(seen) == level_blocks(unet) and all(p is counted[0] for p in seen)
        run(unet, t=480)  # next step: a new plan
        assert len(counted) == 2 and counted[1] is not counted[0]
        run(unet, t=480)  # a new call at the same step also recomputes (reuse_steps=1)
        assert len(counted) == 3
    finally:
        remove_tome(unet)


def test_level_reuse_first_plan_equals_per_block_first_plan(unet, counted):
    apply_tome(unet, ratio=0.5, seed=0, min_tokens=0)
    run(unet)
    apply_tome(unet, ratio=0.5, seed=0, min_tokens=0, reuse="level")
    run(unet)
    remove_tome(unet)
    first_block, level = counted[0], counted[-1]
    assert torch.equal(first_block.group, level.group) and torch.equal(first_block.size, level.size)


def test_reuse_off_is_identical_to_default(unet):
    apply_tome(unet, ratio=0.5, seed=4, min_tokens=0)
    a = run(unet)
    apply_tome(unet, ratio=0.5, seed=4, min_tokens=0, reuse="block", reuse_steps=1)
    assert apply_tome.__module__  # same patch path, no cache object
    assert patch_module.tome_options(unet).reuses_plans is False
    assert unet.__dict__[patch_module.PATCH_ATTR].runtime.cache is None
    b = run(unet)
    remove_tome(unet)
    assert torch.equal(a, b)


def test_level_reuse_changes_output_but_stays_close(unet, base):
    apply_tome(unet, ratio=0.5, seed=4, min_tokens=0)
    per_block = run(unet)
    apply_tome(unet, ratio=0.5, seed=4, min_tokens=0, reuse="level")
    level = run(unet)
    remove_tome(unet)
    rel = lambda a: ((a - base).norm() / base.norm()).item()
    assert not torch.equal(per_block, level)
    assert rel(level) < 2 * rel(per_block) + 0.05


@pytest.mark.parametrize("reuse,steps", [("level", 1), ("block", 2)])
def test_ratio_zero_is_exact_with_reuse(unet, base, reuse, steps):
    apply_tome(unet, ratio=0.0, seed=0, min_tokens=0, reuse=reuse, reuse_steps=steps)
    out = run(unet)
    remove_tome(unet)
    assert torch.equal(out, base)
    assert torch.equal(run(unet), base)


def test_reuse_steps_keeps_plans_for_k_steps(unet, counted):
    apply_tome(unet, ratio=0.5, seed=0, min_tokens=0, reuse="level", reuse_steps=2)
    try:
        run(unet, t=900)
        run(unet, t=880)  # reused
        assert len(counted) == 1
        run(unet, t=860)  # two steps later: recomputed
        assert len(counted) == 2
        run(unet, t=840)
        assert len(counted) == 2
        run(unet, t=999)  # timestep went up: a new sampling run drops every plan
        assert len(counted) == 3
        run(unet, t=999, hw=(16, 16))  # another grid: its own plan
        assert len(counted) == 4
    finally:
        remove_tome(unet)


def test_block_reuse_over_steps_keeps_one_plan_per_block(unet, counted):
    apply_tome(unet, ratio=0.5, seed=0, min_tokens=0, reuse="block", reuse_steps=2)
    try:
        run(unet, t=900)
        run(unet, t=880)
    finally:
        remove_tome(unet)
    assert len(counted) == level_blocks(unet)


def test_plan_cache_unit():
    cache = PlanCache(steps=2)
    made = []
    compute = lambda: made.append(1) or len(made)
    cache.begin_call(10.0)
    assert cache.get("k", compute) == 1 and cache.get("k", compute) == 1
    cache.begin_call(9.0)
    assert cache.get("k", compute) == 1
    cache.begin_call(8.0)
    assert cache.get("k", compute) == 2
    assert cache.computed == 2 and cache.reused == 2
    with pytest.raises(ValueError):
        PlanCache(steps=0)

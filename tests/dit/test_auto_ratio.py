"""ratio="auto" (error budget), block_ratios and schedule files on diffusers denoisers (tiny models)."""

import copy

import pytest
import torch

from tomesd_ext import apply_tome, remove_tome
from tomesd_ext.core import OptionError
from tomesd_ext.core.schedule import ScheduleCache
from tomesd_ext.diffusers import tome_schedule
from tomesd_ext.diffusers.tome import PATCH_ATTR, installed_patch

from .dit_models import make

AUTO = dict(ratio="auto", max_error=0.08, seed=3, min_tokens=0)


@pytest.fixture(autouse=True)
def empty_memory_cache():
    ScheduleCache.memory.clear()
    yield
    ScheduleCache.memory.clear()


def run(m, kw, sample):
    with torch.no_grad():
        return sample(m(**kw))


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def flux():
    return make("flux", batch=2, h=16, w=16)


def test_auto_keeps_the_budget_on_the_call_it_measured_and_reproduces_its_choice(flux):
    m, kw, sample = flux
    ref = run(m, kw, sample)
    chosen = []
    for _ in range(2):  # a fresh patch, an empty cache: the search runs again and chooses the same
        ScheduleCache.memory.clear()
        apply_tome(m, **AUTO)
        out = run(m, kw, sample)
        patch = installed_patch(m, PATCH_ATTR)
        s = tome_schedule(m)
        assert rel(out, ref) <= AUTO["max_error"]
        assert rel(out, ref) == pytest.approx(s.info["error"], rel=1e-4, abs=1e-6)
        assert 0 < patch.auto.extra_forwards <= 12 and s.info["extra_forwards"] == patch.auto.extra_forwards
        assert any(x.ratio > 0 for x in s.settings)  # it merges something
        # one setting per block; each search group's blocks share their group's ratio
        assert len(s.settings) == patch.runtime.n_blocks
        assert sorted(b for g in s.info["groups"] for b in g) == list(range(patch.runtime.n_blocks))
        for g, r in zip(s.info["groups"], s.info["group_ratios"]):
            assert all(s.settings[b].ratio == r for b in g)
        assert patch.auto.extra_forwards <= 1 + len(s.info["groups"]) + 1 + 5
        chosen.append(([x.ratio for x in s.settings], out))
    assert chosen[0][0] == chosen[1][0] and torch.equal(chosen[0][1], chosen[1][1])
    remove_tome(m)
    assert torch.equal(run(m, kw, sample), ref)


def test_a_cache_hit_costs_no_extra_forward(flux, tmp_path):
    m, kw, sample = flux
    apply_tome(m, **AUTO, schedule_cache=str(tmp_path))
    first = run(m, kw, sample)
    assert installed_patch(m, PATCH_ATTR).auto.extra_forwards > 0
    assert run(m, kw, sample).equal(first) and installed_patch(m, PATCH_ATTR).auto.extra_forwards > 0
    for clear in (False, True):  # a new patch: from memory, then (memory cleared) from the folder
        if clear:
            ScheduleCache.memory.clear()
        apply_tome(m, **AUTO, schedule_cache=str(tmp_path))
        calls = []
        handle = m.register_forward_pre_hook(lambda *a: calls.append(1))
        try:
            out = run(m, kw, sample)
        finally:
            handle.remove()
        assert installed_patch(m, PATCH_ATTR).auto.extra_forwards == 0 and len(calls) == 1
        assert torch.equal(out, first)
    assert len(list(tmp_path.glob("*.json"))) == 1
    remove_tome(m)


def test_schedule_file_round_trips_and_another_model_is_refused(flux, tmp_path):
    m, kw, sample = flux
    apply_tome(m, **AUTO)
    out = run(m, kw, sample)
    path = tome_schedule(m).save(str(tmp_path / "flux.json"))
    twin = copy.deepcopy(m)
    remove_tome(twin)
    apply_tome(twin, schedule=path, seed=3, min_tokens=0)
    assert torch.equal(run(twin, kw, sample), out)
    other, _kw, _s = make("flux", batch=2, h=16, w=16, seed=1)  # the same architecture, other weights
    with pytest.raises(OptionError, match="calibrated on another model"):
        apply_tome(other, schedule=path)
    assert installed_patch(other, PATCH_ATTR) is None
    with pytest.raises(OptionError, match="do not combine"):
        apply_tome(twin, schedule=path, ratio="auto", max_error=0.1)
    remove_tome(m)


def test_block_ratios_uniform_is_ratio_and_zero_or_outside_the_window_is_unpatched(flux):
    m, kw, sample = flux  # timestep 0.5 (Flux: 1 .. 0 over sampling): progress 0.5
    ref = run(m, kw, sample)
    apply_tome(m, ratio=0.5, seed=3, min_tokens=0)
    uniform = run(m, kw, sample)
    apply_tome(m, block_ratios=[0.5, 0.5, 0.5], seed=3, min_tokens=0)
    assert torch.equal(run(m, kw, sample), uniform)
    for ratios in ([0.0, 0.0], [{"ratio": 0.5, "start": 0.6}], [{"ratio": 0.5, "end": 0.4}]):
        apply_tome(m, block_ratios=ratios, seed=3, min_tokens=0)
        assert torch.equal(run(m, kw, sample), ref), ratios
    apply_tome(m, block_ratios=[{"ratio": 0.5, "start": 0.4, "end": 0.6}], seed=3, min_tokens=0)
    assert torch.equal(run(m, kw, sample), uniform)
    # per group: the first half of the blocks merged only differs from both
    apply_tome(m, block_ratios=[0.5, 0.0], seed=3, min_tokens=0)
    half = run(m, kw, sample)
    assert not torch.equal(half, ref) and not torch.equal(half, uniform)
    remove_tome(m)


def test_unet_block_ratios_number_the_merged_blocks_in_execution_order():
    from tomesd_ext.models import build_unet

    unet = build_unet("tiny", seed=0).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    text = torch.randn(2, 7, unet.config.cross_attention_dim, generator=g)

    def call():
        with torch.no_grad():
            return unet(x, torch.tensor(500), encoder_hidden_states=text).sample

    apply_tome(unet, ratio=0.5, seed=1, min_tokens=0)
    uniform = call()
    apply_tome(unet, block_ratios=[0.5, {"ratio": 0.5, "start": 0.0, "end": 1.0}], seed=1, min_tokens=0)
    rt = installed_patch(unet, PATCH_ATTR).runtime
    rt.record_shapes = True  # as the budget search does
    assert torch.equal(call(), uniform)
    # the blocks at level 1 only (the first down block's and the last up block's), numbered in order
    assert rt.n_blocks == len(rt.block_shapes) == 5 and sorted(rt.block_shapes) == list(range(5))
    assert {shape[0] for shape in rt.block_shapes.values()} == {16 * 16}
    remove_tome(unet)


def test_auto_on_a_grid_below_min_tokens_merges_nothing_without_error():
    m, kw, sample = make("flux", batch=1, h=8, w=8)
    ref = run(m, kw, sample)
    apply_tome(m, ratio="auto", max_error=0.1, seed=3)  # 64 tokens < min_tokens 2048
    assert torch.equal(run(m, kw, sample), ref)
    assert installed_patch(m, PATCH_ATTR).auto.extra_forwards == 1  # the reference only
    remove_tome(m)

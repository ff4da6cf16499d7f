"""min_tokens: levels with fewer tokens are not merged (the auto-skip rule)."""

import pytest
import torch

from tomesd_ext.core import OptionError, ToMeOptions
from tomesd_ext.core.options import MIN_TOKENS_DEFAULT
from tomesd_ext.diffusers import apply_tome, remove_tome
from tomesd_ext.core import MergeRuntime, TomePolicy


def runtime(opts, max_downsample, latent_hw):
    rt = MergeRuntime(TomePolicy(opts), max_downsample)
    rt.begin_call(latent_hw, 0.0)
    return rt


def test_min_tokens_is_validated():
    assert ToMeOptions.create(seed=0).min_tokens == MIN_TOKENS_DEFAULT
    for bad in (-1, 1.5, True):
        with pytest.raises(OptionError, match="min_tokens"):
            ToMeOptions.create(seed=0, min_tokens=bad)


def test_plan_for_skips_small_grids():
    metric = torch.randn(2, 16 * 16, 8)
    state = runtime(ToMeOptions.create(seed=0, min_tokens=256), 1, (16, 16))
    assert state.plan_for(metric) is not None  # 256 tokens >= 256
    state = runtime(ToMeOptions.create(seed=0, min_tokens=257), 1, (16, 16))
    assert state.plan_for(metric) is None


def test_default_rule_skips_below_and_merges_at_sd15_512():
    state = runtime(ToMeOptions.create(seed=0), 8, (64, 64))  # SD1.5 at 512 px: d=1 has 4096 tokens
    assert state.plan_for(torch.randn(1, 4096, 4)) is not None
    state.begin_call((32, 32), 0.0)  # SD1.5 at 256 px: 1024 tokens, below the measured threshold
    assert MIN_TOKENS_DEFAULT > 1024
    assert state.plan_for(torch.randn(1, 1024, 4)) is None


def test_huge_min_tokens_leaves_the_model_exact(tiny_unet, tiny_inputs):
    x, t, c = tiny_inputs
    with torch.no_grad():
        ref = tiny_unet(x, t, c).sample
        apply_tome(tiny_unet, 0.5, seed=0, min_tokens=10**6)
        try:
            assert torch.equal(tiny_unet(x, t, c).sample, ref)
        finally:
            remove_tome(tiny_unet)
        apply_tome(tiny_unet, 0.5, seed=0, min_tokens=0)
        try:
            assert not torch.equal(tiny_unet(x, t, c).sample, ref)
        finally:
            remove_tome(tiny_unet)

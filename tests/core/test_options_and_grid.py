import warnings

import pytest

from tomesd_ext.core import OptionError, ToMeOptions, level_grid, tokens_to_remove


def test_defaults_validate():
    o = ToMeOptions.create()
    assert o.ratio == 0.5 and o.max_downsample == "auto" and isinstance(o.seed, int)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"ratio": 1.0}, r"ratio=1.0 is out of range: allowed \[0, 1\)"),
        ({"ratio": -0.1}, "ratio=-0.1 is out of range"),
        ({"ratio": "half"}, "ratio must be a number"),
        ({"sx": 0}, r"sx=0 is out of range: allowed \[1, 64\]"),
        ({"sy": 2.5}, "sy must be an int"),
        ({"sx": 1, "sy": 1}, "sx\\*sy must be >= 2"),
        ({"max_downsample": 3}, "max_downsample=3 is not allowed"),
        ({"use_rand": "yes"}, "use_rand must be True or False"),
        ({"seed": -1}, "seed must be None or an int >= 0"),
        ({"merge_attn": False}, "nothing to merge"),
        ({"colour": 1}, "unknown option"),
    ],
)
def test_bad_options_name_argument_value_and_range(kwargs, message):
    with pytest.raises(OptionError, match=message):
        ToMeOptions.create(**kwargs)


def test_ratio_above_window_maximum_is_clamped_with_one_warning():
    with pytest.warns(UserWarning, match="exceeds the maximum 0.75"):
        o = ToMeOptions.create(ratio=0.9)
    assert o.ratio == 0.75
    with pytest.warns(UserWarning, match="maximum 0.8889"):
        assert ToMeOptions.create(ratio=0.95, sx=3, sy=3).ratio == pytest.approx(8 / 9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ToMeOptions.create(ratio=0.75)


def test_seed_none_draws_from_global_rng():
    import torch

    torch.manual_seed(0)
    a = ToMeOptions.create().seed
    torch.manual_seed(0)
    assert ToMeOptions.create().seed == a


@pytest.mark.parametrize(
    "n,hw,expected",
    [
        (4096, (64, 64), (1, 64, 64)),
        (1024, (64, 64), (2, 32, 32)),
        (6305, (65, 97), (1, 65, 97)),
        (33 * 49, (65, 97), (2, 33, 49)),
        (17 * 25, (65, 97), (4, 17, 25)),
        (9 * 13, (65, 97), (8, 9, 13)),
        (77, (64, 64), None),
        (16, (64, 64), (16, 4, 4)),
    ],
)
def test_level_grid(n, hw, expected):
    assert level_grid(n, hw) == expected


def test_tokens_to_remove_caps_at_sources():
    assert tokens_to_remove(0.5, 4096, 3072) == 2048
    assert tokens_to_remove(0.75, 65 * 97, 65 * 97 - 32 * 48) == int(0.75 * 65 * 97)
    assert tokens_to_remove(0.9, 100, 75) == 75

"""Per-block settings and the error-budget search (core/schedule.py), on synthetic errors."""

import pytest

from tomesd_ext.core import OptionError, ToMeOptions
from tomesd_ext.core.schedule import (
    AUTO_VERIFY, BlockSetting, Schedule, block_cost, block_settings, group_of, per_block, search, search_groups,
)


def fake_model(weights, power=2.0, cross=0.3):
    """A measure(ratios) with groups of different sensitivity and some interaction, and a counter."""
    calls = []

    def measure(ratios):
        calls.append(ratios)
        parts = [w * r**power for w, r in zip(weights, ratios)]
        return sum(parts) + cross * max(parts) * (len([p for p in parts if p]) > 1)

    return measure, calls


def cost(ratios):
    return sum(block_cost(1024, 64, r, "block") for r in ratios)


def test_search_is_deterministic_bounded_and_within_budget():
    weights = (0.4, 0.05, 0.2)
    budget = fake_model(weights)[0]((0.375,) * 3)  # the error of a uniform ratio
    results = []
    for _ in range(2):
        measure, calls = fake_model(weights)
        r = search(measure, cost, 3, 0.75, budget)
        results.append((r.ratios, r.error, len(calls)))
        assert r.error <= budget
        assert r.forwards == len(calls) + 1 <= 1 + 2 * 3 + AUTO_VERIFY
        # the choice is the cheapest measured point within the budget
        ok = [c for ratios, e, c in r.points if e <= budget]
        assert r.cost == min(ok)
    assert results[0] == results[1]
    # the insensitive middle group merges more than the sensitive first one, and it beats uniform
    ratios = results[0][0]
    assert ratios[1] > ratios[0] and cost(ratios) < cost((0.375,) * 3)


def test_search_falls_back_to_nothing_merged_when_no_candidate_fits():
    measure, calls = fake_model((10.0, 10.0), power=0.5)
    r = search(measure, cost, 2, 0.75, 1e-3)
    assert r.ratios == (0.0, 0.0) and r.error == 0.0 and r.cost == r.full_cost


def test_groups_split_blocks_in_order():
    assert [group_of(i, 7, 3) for i in range(7)] == [0, 0, 0, 1, 1, 2, 2]
    assert [group_of(i, 2, 3) for i in range(2)] == [0, 1]


def test_block_settings_validate_and_windows_apply():
    s = block_settings([0.5, {"ratio": 0.25, "start": 0.2, "end": 0.6}], 0.75)
    assert s == (BlockSetting(0.5), BlockSetting(0.25, 0.2, 0.6))
    assert s[1].at(0.1) == 0.0 and s[1].at(0.4) == 0.25 and s[1].at(None) == 0.25
    for bad, match in [([], "non-empty"), (0.5, "non-empty"), ([0.8], r"block_ratios\[0\] ratio=0.8"),
                       ([{"ratio": 0.1, "start": 0.7, "end": 0.2}], "start=0.7"), ([{"r": 0.1}], "needs 'ratio'"),
                       ([True], "ratio=True")]:
        with pytest.raises(OptionError, match=match):
            block_settings(bad, 0.75)


def test_options_of_auto_and_block_ratios():
    o = ToMeOptions.create(ratio="auto", max_error=0.05, seed=0)
    assert o.auto and o.ratio == 0.75 and o.max_error == 0.05 and o.block_ratios is None
    o = ToMeOptions.create(block_ratios=[0.5, 0.25], seed=0)
    assert o.block_ratios == (BlockSetting(0.5), BlockSetting(0.25)) and not o.auto
    for kw, match in [({"ratio": "auto"}, "needs max_error"), ({"max_error": 0.1}, "needs ratio='auto'"),
                      ({"ratio": "auto", "max_error": 0.0}, r"max_error=0.0 is out of range"),
                      ({"ratio": "auto", "max_error": 0.1, "block_ratios": [0.1]}, "do not combine"),
                      ({"block_ratios": [0.5], "mode": "importance"}, "mode='tome' only"),
                      ({"ratio": "half"}, "ratio must be a number")]:
        with pytest.raises(OptionError, match=match):
            ToMeOptions.create(**kw)


def test_schedule_file_round_trips_and_refuses_another_model(tmp_path):
    s = Schedule((BlockSetting(0.5), BlockSetting(0.25, 0.0, 0.5)), "abc123", {"error": 0.01})
    path = s.save(str(tmp_path / "s.json"))
    back = Schedule.load(path)
    assert back == s and back.info == {"error": 0.01}
    back.check_model("abc123")
    with pytest.raises(OptionError, match="calibrated on another model"):
        back.check_model("def456")
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    with pytest.raises(OptionError, match="not a tomesd-ext schedule"):
        Schedule.load(str(tmp_path / "bad.json"))
    with pytest.raises(OptionError, match="cannot be read"):
        Schedule.load(str(tmp_path / "missing.json"))


def test_a_known_point_is_a_candidate_and_costs_no_forward():
    weights = (0.4, 0.05, 0.2)
    uniform = (0.5,) * 3
    budget = fake_model(weights)[0](uniform)
    measure, calls = fake_model(weights)
    r = search(measure, cost, 3, 0.75, budget, known={uniform: budget})
    assert uniform not in calls and r.error <= budget and r.cost <= cost(uniform)


def rss_model(weights, power):
    """measure(ratios): groups' errors w * r ** power adding like independent noise, and a counter."""
    calls = []

    def measure(ratios):
        calls.append(ratios)
        return sum((w * r**power) ** 2 for w, r in zip(weights, ratios)) ** 0.5

    return measure, calls


def attn_cost(ratios):  # attention-dominated blocks (a UNet's level 1 at 1024 px)
    return sum(block_cost(16384, 320, r, "attn") for r in ratios)


def test_search_groups_put_the_first_and_last_block_alone():
    assert search_groups(28) == ((0,), tuple(range(1, 10)), tuple(range(10, 19)), tuple(range(19, 27)), (27,))
    assert search_groups(4) == ((0,), (1,), (2,), (3,))
    assert search_groups(6) == ((0,), (1, 2), (3,), (4,), (5,))
    assert search_groups(0) == ()
    assert per_block((0.5, 0.25), ((0, 2), (1,)), 4) == (0.5, 0.25, 0.5, 0.0)


@pytest.mark.parametrize("power", [0.7, 1.0, 1.5])
def test_search_beats_uniform_at_its_error_when_blocks_differ(power):
    # per-block sensitivities of the sharpened SD 1.5 UNet's five level-1 blocks at ratio 0.5
    weights = tuple(e / 0.5**power for e in (0.0436, 0.0246, 0.0223, 0.0341, 0.0516))
    uniform = (0.5,) * 5
    budget = rss_model(weights, power)[0](uniform)
    picks = []
    for _ in range(2):
        measure, calls = rss_model(weights, power)
        r = search(measure, attn_cost, 5, 0.75, budget, known={uniform: budget})
        picks.append((r.ratios, len(calls)))
        assert r.error <= budget and uniform not in calls
        assert r.forwards == len(calls) + 1 <= 1 + 5 + AUTO_VERIFY  # the known point spares the shape forward
        assert r.exponent == pytest.approx(power, abs=1e-6)  # the model is exact here: the fit finds it
        assert r.cost < 0.9 * attn_cost(uniform)  # >= 10 % cheaper merged operators at equal error
    assert picks[0] == picks[1]
    # the least sensitive blocks merge most
    assert max(picks[0][0]) in (picks[0][0][1], picks[0][0][2]) and picks[0][0][4] < 0.5


def test_search_without_a_known_point_spends_one_shape_forward_and_stays_bounded():
    weights = (0.09, 0.05, 0.04, 0.07, 0.1)
    measure, calls = rss_model(weights, 0.8)
    budget = 0.08
    r = search(measure, attn_cost, 5, 0.75, budget)
    assert calls[:6] == [tuple(0.75 if i == g else 0.0 for i in range(5)) for g in range(5)] + [(0.375,) * 5]
    assert r.forwards == len(calls) + 1 <= 12 and r.error <= budget
    assert r.exponent == pytest.approx(0.8, abs=1e-6)


def test_search_backs_off_when_the_model_under_predicts():
    # errors add linearly (a plain sum), so the root-of-squares model under-predicts every
    # multi-group setting: verifications over the budget raise the correction and the result
    # is still the cheapest measured point within the budget
    calls = []

    def error(ratios):
        return sum(0.05 * r**0.7 for r in ratios)

    def measure(ratios):
        calls.append(ratios)
        return error(ratios)

    budget = error((0.5,) * 4)
    r = search(measure, attn_cost, 4, 0.75, budget)
    over = [s for s in calls if error(s) > budget]
    assert over and r.error <= budget and r.correction > 1.0
    assert r.cost == min(c for s, e, c in r.points if e <= budget)
    assert r.forwards <= 1 + 4 + 1 + AUTO_VERIFY


def test_search_refuses_a_grid_too_large_to_enumerate():
    measure, calls = rss_model((0.1,) * 8, 1.0)
    with pytest.raises(ValueError, match="at most 5 groups"):
        search(measure, attn_cost, 8, 0.75, 0.1)
    assert calls == []

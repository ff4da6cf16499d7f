"""The ToMe node with max_error > 0 (ratio="auto") on ComfyUI's own Flux: the budget holds on the
call the search measured, a second call searches nothing, and UNets refuse it clearly."""

import pytest
import torch

from comfy_env import import_comfy, tome_node
from dit_models import comfy_from_diffusers, inputs, run_dit, tiny_diffusers

pytestmark = pytest.mark.comfyui

SIGMA = 0.7
BUDGET = 0.05


@pytest.fixture(scope="module")
def flux():
    import_comfy()
    return comfy_from_diffusers(tiny_diffusers("flux"), "flux")


def _chooser(patcher):
    """The AutoChooser of the node's patch (its APPLY_MODEL wrapper's state)."""
    for by_key in patcher.wrappers.values():
        for wrappers in by_key.values():
            for w in wrappers:
                auto = getattr(getattr(w, "state", None), "auto", None)
                if auto is not None:
                    return auto
    return None


def test_auto_keeps_the_budget_and_searches_once(flux):
    from tomesd_ext.core.schedule import ScheduleCache

    ScheduleCache.memory.clear()
    x, ctx, conds = inputs("flux")
    ref = run_dit(flux, x, SIGMA, ctx, **conds)
    patched = tome_node(flux, max_error=BUDGET, seed=3)
    out = run_dit(patched, x, SIGMA, ctx, **conds)
    chooser = _chooser(patched)
    spent = chooser.extra_forwards
    assert 1 < spent <= 12
    # the search measures what the sampler receives: the denoised prediction x - sigma * v
    denoised, denoised_ref = x - SIGMA * out, x - SIGMA * ref
    error = ((denoised - denoised_ref).norm() / denoised_ref.norm()).item()
    assert error <= BUDGET and error == pytest.approx(chooser.last.info["error"], rel=1e-3, abs=1e-6)
    assert any(s.ratio > 0 for s in chooser.last.settings)
    again = run_dit(patched, x, SIGMA, ctx, **conds)
    assert chooser.extra_forwards == spent and torch.equal(again, out)
    assert torch.equal(run_dit(flux, x, SIGMA, ctx, **conds), ref)  # the input MODEL is untouched
    ScheduleCache.memory.clear()


def test_unets_refuse_auto_with_a_clear_error():
    from comfy_env import comfy_model_from_diffusers

    from tomesd_ext.core import OptionError
    from tomesd_ext.models import build_unet

    import_comfy()
    with pytest.raises(OptionError, match="not supported on ComfyUI's UNets"):
        tome_node(comfy_model_from_diffusers(build_unet("tiny", seed=0)), max_error=0.05)

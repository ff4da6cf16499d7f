"""unet_mode="block" on diffusers UNets: each BasicTransformerBlock runs whole on merged tokens and
its update is unmerged (core/block.py). Exact at ratio 0 and after removal, the block's output is
x + unmerge(block(merge(x)) - merge(x)) with the plan of the call, every operator of the block sees
the merged tokens."""

import pytest
import torch

from conftest import run, unet_inputs
from tomesd_ext.core import MergeRuntime, OptionError, merge, unmerge
from tomesd_ext.core.block import block_metric, unet_mode
from tomesd_ext.diffusers import apply_query_merge, apply_tome, remove_tome, tome_options
from tomesd_ext.diffusers.discovery import transformer_blocks
from tomesd_ext.diffusers.tome import PATCH_ATTR


def processors(unet):
    return {name: type(p) for name, p in unet.attn_processors.items()}


@pytest.mark.parametrize("name", ["tiny_unet", "tiny_sdxl_unet"])
@pytest.mark.filterwarnings("ignore:tomesd-ext importance mode")
@pytest.mark.parametrize("mode", ["tome", "importance"])
def test_ratio_zero_exact_merged_differs_removal_exact(request, name, mode):
    unet = request.getfixturevalue(name)
    inputs = unet_inputs(unet)
    before = processors(unet)
    ref = run(unet, inputs)
    apply_tome(unet, 0.0, seed=1, unet_mode="block", mode=mode)
    assert torch.equal(run(unet, inputs), ref)
    apply_tome(unet, 0.5, seed=1, unet_mode="block", mode=mode)
    assert getattr(unet, PATCH_ATTR).unet_mode == "block"
    out = run(unet, inputs)  # importance mode: no CFG pair here, so ToMe's windows (it warns)
    assert not torch.allclose(out, ref, atol=1e-4) and torch.isfinite(out).all()
    remove_tome(unet)
    assert processors(unet) == before and tome_options(unet) is None
    assert torch.equal(run(unet, inputs), ref)


def test_block_output_is_input_plus_unmerged_update(tiny_unet):
    """The patched block's output equals the formula, computed here from the block unpatched, the
    call's own arguments and the plan the runtime gave it; its operators see N - r tokens."""
    unet = tiny_unet
    inputs = unet_inputs(unet)
    block = next(transformer_blocks(unet))
    seen = {}
    plans = []
    plan_for = MergeRuntime.plan_for

    def spy(self, metric, scope=None):
        plan = plan_for(self, metric, scope)
        plans.append((metric, plan))
        return plan

    def first(key):
        def hook(module, args, kwargs, *rest):
            seen.setdefault(key, (args, kwargs, rest[0] if rest else None))
            return None
        return hook

    def tokens(part):
        def hook(module, args, kwargs):
            seen.setdefault(part, (args[0] if args else kwargs["hidden_states"]).shape[1])
            return None
        return hook

    handles = [block.register_forward_pre_hook(first("in"), with_kwargs=True)]  # before the patch's hooks
    for part in ("attn1", "attn2", "ff"):
        handles.append(getattr(block, part).register_forward_pre_hook(tokens(part), with_kwargs=True))
    apply_tome(unet, 0.5, seed=2, unet_mode="block")
    handles.append(block.register_forward_hook(first("out"), with_kwargs=True))  # after them
    mp = pytest.MonkeyPatch()
    mp.setattr(MergeRuntime, "plan_for", spy)
    try:
        run(unet, inputs)
    finally:
        mp.undo()
        remove_tome(unet)
        for h in handles:
            h.remove()
    args, kwargs, _ = seen["in"]
    out = seen["out"][2]
    x = args[0]
    metric, plan = plans[0]
    assert plan is not None and torch.equal(metric, block_metric(x))
    n, m = plan.n_tokens, plan.n_groups
    assert x.shape[1] == n and m < n
    assert seen["attn1"] == seen["attn2"] == seen["ff"] == m  # the whole block ran on merged tokens
    merged = merge(x, plan)
    with torch.no_grad():
        y = block(merged, *args[1:], **kwargs)
    torch.testing.assert_close(out, x + unmerge(y - merged, plan), rtol=0, atol=0)


def test_forward_chunking_along_tokens(tiny_unet):
    """diffusers' feed-forward chunking along tokens needs a multiple of the chunk size: a merged
    count that is none runs unmerged; chunk size 1 merges."""
    unet = tiny_unet
    inputs = unet_inputs(unet, hw=(16, 16))  # 256 tokens at the merged level
    ref = run(unet, inputs)
    def chunking(size):
        for block in transformer_blocks(unet):
            block.set_chunk_feed_forward(size, 1)

    try:
        chunking(1)
        apply_tome(unet, 0.3, seed=2, unet_mode="block")
        assert not torch.allclose(run(unet, inputs), ref, atol=1e-4)
        chunking(16)  # 256 - 76 = 180 merged tokens: no multiple
        torch.testing.assert_close(run(unet, inputs), ref, rtol=1e-5, atol=1e-5)
    finally:
        remove_tome(unet)
        for block in transformer_blocks(unet):
            block.set_chunk_feed_forward(None, 0)


def test_block_mode_shares_plans_and_keeps_other_options(tiny_unet):
    """reuse="level" gives the blocks of a level one plan in block mode too; the query-merge
    method stays around self-attention; a bad unet_mode names the argument."""
    unet = tiny_unet
    inputs = unet_inputs(unet)
    try:
        apply_tome(unet, 0.5, seed=2, unet_mode="block", reuse="level")
        level = run(unet, inputs)
        apply_tome(unet, 0.5, seed=2, unet_mode="block")
        per_block = run(unet, inputs)
    finally:
        remove_tome(unet)
    assert not torch.equal(level, per_block)
    apply_query_merge(unet, 0.5, seed=2, min_tokens=0)
    try:
        assert getattr(unet, PATCH_ATTR).unet_mode == "ops"
    finally:
        remove_tome(unet)
    with pytest.raises(OptionError, match="unet_mode='blocks'"):
        apply_tome(unet, 0.5, unet_mode="blocks")
    assert getattr(unet, PATCH_ATTR, None) is None


def test_auto_is_the_measured_default():
    from tomesd_ext.core import ToMeOptions
    from tomesd_ext.core.block import UNET_DEFAULT_MODE

    assert unet_mode(ToMeOptions.create(seed=0)) == UNET_DEFAULT_MODE
    assert unet_mode(ToMeOptions.create(seed=0, unet_mode="ops")) == "ops"
    assert unet_mode(ToMeOptions.create(seed=0, unet_mode="block")) == "block"

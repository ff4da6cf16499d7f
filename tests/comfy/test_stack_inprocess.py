"""Our merge nodes beside ComfyUI's own EasyCache / LazyCache nodes (comfy_extras/nodes_easycache.py)
and its TorchCompileModel node (comfy_extras/nodes_torch_compile.py) in one graph, in-process on the
tiny SD model through ComfyUI's own CFG sampler: both active (the cache skips UNet calls, our
patch shortens the self-attention of every call that runs), in either order with the same result,
and the input model untouched.

Merging is seen by a spy: another attn1 patch added after ours records the token count that the
attention receives (1024 at the 32x32 level unmerged, 512 merged at ratio 0.5). Skipping is seen by
the number of attention calls (a skipped step runs no block) and by EasyCache's own log line.
"""

import logging

import pytest
import torch

from comfy_env import comfy_model_from_diffusers, import_comfy, importance_node, tome_node
from test_importance_inprocess import _sample as _cfg_sample
from test_inprocess import TINY_HEADS, _tiny_unet

pytestmark = pytest.mark.comfyui

STEPS, BLOCKS = 10, 11  # sampling steps; attention blocks of the tiny UNet (one attn1 call each per UNet call)


@pytest.fixture(scope="module")
def tiny():
    import_comfy()
    return comfy_model_from_diffusers(_tiny_unet("tiny"), "sd", TINY_HEADS)


@pytest.fixture(scope="module")
def conds():
    g = torch.Generator().manual_seed(0)
    pos = [[torch.randn(1, 77, 32, generator=g), {}]]
    neg = [[torch.randn(1, 77, 32, generator=g), {}]]
    return pos, neg, torch.randn(1, 4, 32, 32, generator=g)


def _sample(model, conds):
    """ComfyUI's CFG sampler (euler, normal, cfg 5): a KSampler's path, with its OUTER_SAMPLE /
    CALC_COND_BATCH / DIFFUSION_MODEL / APPLY_MODEL wrappers."""
    return _cfg_sample(model, conds, steps=STEPS)


def _spied(model):
    """A clone with an attn1 patch after every other one that records the tokens attention sees."""
    seen = []

    def record(n, context, value, extra_options):
        seen.append(n.shape[1])
        return n, context, value

    m = model.clone()
    m.set_model_attn1_patch(record)
    return m, seen


def _easycache(model, threshold=0.2):
    from comfy_extras.nodes_easycache import EasyCacheNode

    return EasyCacheNode.execute(model, threshold, 0.15, 0.95, False)[0]


def _lazycache(model, threshold=0.2):
    from comfy_extras.nodes_easycache import LazyCacheNode

    return LazyCacheNode.execute(model, threshold, 0.15, 0.95, False)[0]


def _snapshot(model):
    return (repr(model.model_options), repr(model.wrappers), dict(model.object_patches), len(model.patches))


def _skipped(caplog, name):
    """The steps the cache said it skipped in its end-of-sampling log line."""
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"{name} - skipped ")]
    assert len(lines) == 1, lines
    return int(lines[0].split()[3].split("/")[0])


@pytest.mark.parametrize("cache", ["EasyCache", "LazyCache"])
@pytest.mark.parametrize("merge", ["tome", "importance"])
def test_cache_and_merging_both_active_in_either_order(tiny, conds, caplog, cache, merge):
    add_cache = _easycache if cache == "EasyCache" else _lazycache
    add_merge = (lambda m: tome_node(m, ratio=0.5, seed=1)) if merge == "tome" else (lambda m: importance_node(m, ratio=0.5, seed=1))
    before = _snapshot(tiny)

    plain, plain_seen = _spied(tiny)
    reference = _sample(plain, conds)
    assert len(plain_seen) == STEPS * BLOCKS and max(plain_seen) == 1024
    cached, cached_seen = _spied(add_cache(tiny))
    cache_only = _sample(cached, conds)

    results = {}
    for order, build in (("merge->cache", lambda: add_cache(add_merge(tiny))), ("cache->merge", lambda: add_merge(add_cache(tiny)))):
        caplog.clear()
        with caplog.at_level(logging.INFO):
            model, seen = _spied(build())
            results[order] = out = _sample(model, conds)
        skipped = _skipped(caplog, cache)
        assert skipped > 0, order  # the cache skipped steps ...
        assert len(seen) < STEPS * BLOCKS and len(seen) % BLOCKS == 0, order  # ... whole UNet calls
        assert max(seen) == 512 and 1024 not in seen, order  # ... and every call that ran was merged
        assert torch.isfinite(out).all()
        assert not torch.allclose(out, cache_only, atol=1e-4)  # merging changes the cached result
        rel = ((out - reference).abs().mean() / reference.abs().mean()).item()
        assert rel < 0.5, (order, rel)  # still the same sample, roughly
    assert len(cached_seen) < STEPS * BLOCKS
    assert torch.equal(results["merge->cache"], results["cache->merge"])  # the order does not matter
    assert _snapshot(tiny) == before  # the input model is untouched


@pytest.mark.parametrize("order", ["compile->tome->easycache", "tome->easycache->compile"])
def test_torch_compile_with_tome_and_easycache(tiny, conds, caplog, order):
    """TorchCompileModel (dynamo through the whole UNet call, our wrapper and patches included)
    with our node and EasyCache: runs, merges, skips, and gives the eager result to float noise.

    Backend "cudagraphs": on the CPU it is dynamo + AOT autograd without code generation (the
    shipped workflow's inductor backend is run by test_server_stack.py). Our patches trace into
    the graph (no break inside the blocks), so a Python-side spy is not replayed per call there:
    merging under compile shows in the output (the eager merged result, far from the unmerged one)."""
    from comfy_extras.nodes_torch_compile import TorchCompileModel

    compile_node = lambda m: TorchCompileModel.execute(m, "cudagraphs")[0]  # noqa: E731
    stack = lambda m: _easycache(tome_node(m, ratio=0.5, seed=1))  # noqa: E731
    before = _snapshot(tiny)
    eager_model, eager_seen = _spied(stack(tiny))
    eager = _sample(eager_model, conds)
    assert max(eager_seen) == 512
    unmerged = _sample(_easycache(tiny), conds)

    caplog.clear()
    with caplog.at_level(logging.INFO):
        built = stack(compile_node(tiny)) if order.startswith("compile") else compile_node(stack(tiny))
        out = _sample(built, conds)
    assert _skipped(caplog, "EasyCache") > 0
    torch.testing.assert_close(out, eager, rtol=1e-3, atol=1e-3)
    assert (out - unmerged).abs().max() > 0.05  # merged: far from the unmerged result
    assert _snapshot(tiny) == before

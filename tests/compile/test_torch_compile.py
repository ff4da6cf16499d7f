"""apply_tome then torch.compile: no graph break inside the merged blocks, one graph per image size
and ratio (not per step: the step's random partition is drawn outside the graph), the same output
as eager.

Dynamo is what decides graph breaks and recompiles, so most tests compile with the "eager" backend
(dynamo's graph, run by the eager interpreter: bit-identical to eager, seconds instead of minutes);
one runs AOT autograd ("aot_eager": functionalised graph) against float tolerance. Inductor itself
is exercised by `tomesd-ext bench --methods compile,tome+compile` (docs/benchmarks.md).
"""

import copy
from collections import Counter

import pytest
import torch
from torch._dynamo.utils import counters

from tomesd_ext.diffusers import apply_tome, remove_tome, tome_options
from tomesd_ext.models.build import build_pipeline, build_unet
from tomesd_ext.models.dit_build import build_transformer
from tomesd_ext.models.dit_call import LATENT_CHANNELS, dit_call, text_conditioning
from tomesd_ext.models.video_call import VIDEO_CHANNELS

STEPS = (900, 700, 500, 300)
# The denoiser's call-start/end hooks are torch.compiler.disable'd (Python call state): dynamo
# reports them as breaks around the whole model when it traces a function calling the model.
CALL_HOOKS = "torch.compiler.disable"


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.fixture(scope="module")
def unet():
    return build_unet("tiny").eval()


def unet_inputs(unet, res=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, unet.config.in_channels, res, res, generator=g)
    ctx = torch.randn(2, 7, unet.config.cross_attention_dim, generator=g)
    return x, ctx


def run_unet(model, x, t, ctx):
    with torch.no_grad():
        return model(x, torch.tensor(t), ctx).sample


UNET_MODES = ["ops", "block"]


@pytest.mark.parametrize("mode", UNET_MODES)
def test_unet_merged_blocks_have_no_graph_break(unet, mode):
    x, ctx = unet_inputs(unet)
    apply_tome(unet, 0.5, min_tokens=0, merge_mlp=True, unet_mode=mode)
    try:
        with torch.no_grad():
            explained = torch._dynamo.explain(unet)(x, torch.tensor(500), ctx)
    finally:
        remove_tome(unet)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1


@pytest.mark.parametrize("mode", UNET_MODES)
def test_unet_one_graph_per_size_and_ratio_and_eager_output(unet, mode):
    x, ctx = unet_inputs(unet)
    plain = run_unet(unet, x, 500, ctx)
    apply_tome(unet, 0.5, min_tokens=0, unet_mode=mode)
    compiled = torch.compile(unet, backend="eager")
    try:
        for t in STEPS:  # every step draws another partition: same graph
            eager = run_unet(unet, x, t, ctx)
            assert torch.equal(run_unet(compiled, x, t, ctx), eager)
        assert graphs() == 1
        merged_500 = run_unet(unet, x, 500, ctx)
        assert (merged_500 - plain).abs().max() > 1e-4  # merging is on in what was compiled

        x48, ctx48 = unet_inputs(unet, 48)
        for t in STEPS[:2]:  # another image size: one more graph
            assert torch.equal(run_unet(compiled, x48, t, ctx48), run_unet(unet, x48, t, ctx48))
        assert graphs() == 2

        apply_tome(unet, 0.3, min_tokens=0, unet_mode=mode)  # another ratio: one more graph
        for t in STEPS[:2]:
            assert torch.equal(run_unet(compiled, x, t, ctx), run_unet(unet, x, t, ctx))
        assert graphs() == 3
    finally:
        remove_tome(unet)
    assert torch.equal(run_unet(compiled, x, 500, ctx), plain)  # removal is seen by the compiled model


@pytest.mark.parametrize("mode", UNET_MODES)
def test_unet_aot_graph_matches_eager(unet, mode):
    x, ctx = unet_inputs(unet, seed=1)
    apply_tome(unet, 0.5, min_tokens=0, unet_mode=mode)
    try:
        compiled = torch.compile(unet, backend="aot_eager")
        for t in STEPS[:2]:
            torch.testing.assert_close(run_unet(compiled, x, t, ctx), run_unet(unet, x, t, ctx), rtol=1e-5, atol=1e-5)
    finally:
        remove_tome(unet)


DIT = {  # bench/test model name -> family
    "tiny-flux": "flux", "tiny-flux2": "flux2", "tiny-sd3": "sd3", "tiny-pixart": "pixart",
    "tiny-qwen-image": "qwen-image", "tiny-z-image": "z-image",
    "tiny-wan": "wan", "tiny-ltx": "ltx-video", "tiny-hunyuan-video": "hunyuan-video",
}


def dit_setup(name, seed=0):
    family = DIT[name]
    model = build_transformer(name).eval()
    cond = text_conditioning(family, dict(model.config), 2, 8, seed)
    g = torch.Generator().manual_seed(seed)
    if family in VIDEO_CHANNELS:
        x = torch.randn(2, VIDEO_CHANNELS[family], 3, 16, 16, generator=g)
    else:
        x = torch.randn(2, LATENT_CHANNELS[family], 16, 16, generator=g)

    def call(m, t):
        with torch.no_grad():
            return dit_call(m, family, x, t, cond["text"], cond["pooled"])

    return model, call


def model_breaks(call, model):
    """Graph-break reasons of one call, without those of our call hooks."""
    explained = torch._dynamo.explain(lambda: call(model, 500))()
    return [b.reason.splitlines()[0] for b in explained.break_reasons if CALL_HOOKS not in b.reason]


@pytest.mark.parametrize("name", sorted(DIT))
def test_dit_merged_blocks_add_no_graph_break(name):
    model, call = dit_setup(name)
    own = Counter(model_breaks(call, model))  # the family's own (Z-Image's rotary cache breaks in diffusers)
    apply_tome(model, 0.5, min_tokens=0)
    assert Counter(model_breaks(call, model)) - own == Counter()


@pytest.mark.parametrize("name,mode", [("tiny-flux", "block"), ("tiny-flux", "attn"), ("tiny-flux", "kv"),
                                       ("tiny-wan", "block"), ("tiny-sd3", "kv")])
def test_dit_one_graph_across_steps_and_eager_output(name, mode):
    model, call = dit_setup(name, seed=2)
    plain = call(model, 500)
    apply_tome(model, 0.5, min_tokens=0, dit_mode=mode)
    assert model_breaks(call, model) == []
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="eager")
    for t in STEPS:
        assert torch.equal(call(compiled, t), call(model, t))
    assert graphs() == 1
    assert (call(model, 500) - plain).abs().max() > 1e-4


@pytest.mark.parametrize("mode", ["block", "attn", "kv"])
def test_dit_patch_after_compiling_is_seen(mode):
    """torch.compile does not guard module hooks (block and attn mode live in hooks): a patch
    applied or removed after compiling must still reach the compiled model."""
    model, call = dit_setup("tiny-flux", seed=3)
    compiled = torch.compile(model, backend="eager")
    plain = call(compiled, 500)
    apply_tome(model, 0.5, min_tokens=0, dit_mode=mode)
    merged = call(model, 500)
    assert (merged - plain).abs().max() > 1e-4
    assert torch.equal(call(compiled, 500), merged)
    remove_tome(model)
    assert torch.equal(call(compiled, 500), plain)


@pytest.mark.parametrize("mode", ["block", "kv"])
def test_compiled_transformer_of_a_pipeline_unpatches_and_repatches(mode):
    """The documented recipe (apply_tome, then pipe.transformer = torch.compile(...)): the pipeline
    is patched, unpatched and patched again through the compiled transformer."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    model, call = dit_setup("tiny-flux", seed=4)
    plain = call(model, 500)
    eager = copy.deepcopy(model)
    apply_tome(eager, 0.3, min_tokens=0, dit_mode=mode, seed=1)
    eager_03 = call(eager, 500)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=model)
    apply_tome(pipe, 0.5, min_tokens=0, dit_mode=mode, seed=1)
    merged = call(model, 500)
    pipe.transformer = torch.compile(pipe.transformer, backend="eager")
    assert torch.equal(call(pipe.transformer, 500), merged)
    assert tome_options(pipe).ratio == 0.5
    remove_tome(pipe)
    assert tome_options(pipe) is None
    assert torch.equal(call(pipe.transformer, 500), plain)  # recompiled: no merging left
    apply_tome(pipe, 0.3, min_tokens=0, dit_mode=mode, seed=1)
    assert tome_options(pipe).ratio == 0.3
    assert torch.equal(call(pipe.transformer, 500), eager_03)


def test_compiled_unet_of_a_pipeline_and_a_compiled_model_are_patched():
    pipe = build_pipeline("tiny")
    x, ctx = unet_inputs(pipe.unet)
    plain = run_unet(pipe.unet, x, 500, ctx)
    pipe.unet = torch.compile(pipe.unet, backend="eager")
    apply_tome(pipe, 0.5, min_tokens=0, seed=1)
    merged = run_unet(pipe.unet, x, 500, ctx)
    assert (merged - plain).abs().max() > 1e-4
    assert torch.equal(merged, run_unet(pipe.unet._orig_mod, x, 500, ctx))
    remove_tome(pipe)
    assert torch.equal(run_unet(pipe.unet, x, 500, ctx), plain)

    compiled = pipe.unet  # the compiled module itself
    assert apply_tome(compiled, 0.5, min_tokens=0, seed=1) is compiled
    assert tome_options(compiled).ratio == 0.5 and tome_options(compiled._orig_mod).ratio == 0.5
    assert torch.equal(run_unet(compiled, x, 500, ctx), merged)
    remove_tome(compiled)
    assert tome_options(compiled._orig_mod) is None
    assert torch.equal(run_unet(compiled, x, 500, ctx), plain)

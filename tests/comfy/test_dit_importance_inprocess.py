"""The importance node on ComfyUI's transformers (Flux, SD3, Qwen-Image, PixArt, Lumina2 / Z-Image,
Wan, HunyuanVideo, LTX-Video; tiny random weights): exact at ratio 0, the map of a CFG step
(ComfyUI's post-CFG hook) planning the next step's calls on fewer image tokens, parity with the
diffusers importance adapter on the same weights (SD3, Flux, Wan), ComfyUI's own sampler,
cfg = 1 (guidance-distilled Flux) falling back to ToMe with one warning, and the warning of a
model it cannot patch."""

import logging

import pytest
import torch

from comfy_env import fake_dit_model, import_comfy, importance_node, tome_node
from dit_models import (assert_same_merge, comfy_from_diffusers, inputs, recorded_plans, run_diffusers, run_dit,
                        tiny_comfy_qwen, tiny_diffusers)
from test_dit_hooks_inprocess import call_inputs, tiny
from video_dit_models import diffusers_wan_from_comfy, run_diffusers_wan, tiny_comfy_video, video_inputs

pytestmark = pytest.mark.comfyui

IMAGE = ("flux", "sd3")
HOOKED = ("pixart", "lumina2", "z-image")
VIDEO = ("wan", "hunyuan", "ltxv")
FAMILIES = IMAGE + ("qwen",) + HOOKED + VIDEO
SIGMAS = (0.9, 0.6)


@pytest.fixture(scope="module")
def models():
    import_comfy()
    out = {}
    for family in IMAGE:
        d = tiny_diffusers(family)
        out[family] = (d, comfy_from_diffusers(d, family))
    out["qwen"] = (None, tiny_comfy_qwen())
    for family in HOOKED:
        out[family] = (None, tiny(family))
    for family in VIDEO:
        out[family] = (None, tiny_comfy_video(family))
    return out


def cfg_inputs(family):
    """(latent (1, ...), text (2, n, 32) as [uncond, cond], extra conds of a batch of 2)."""
    if family in IMAGE:
        x, ctx, conds = inputs(family)
    elif family == "qwen":
        g = torch.Generator().manual_seed(1)
        x, ctx, conds = torch.randn(2, 16, 1, 16, 12, generator=g), torch.randn(2, 7, 32, generator=g), {}
    elif family in HOOKED:
        x, ctx, conds = call_inputs(family)
    else:
        x, ctx, conds = video_inputs(family)
    return x[:1], ctx, conds


def cfg_steps(model, family, sigmas=SIGMAS, cfg=4.0):
    """ComfyUI's CFG steps by hand: per sigma one call on [uncond, cond] (the latent twice), then
    the post-CFG functions with its x0 predictions, as ComfyUI's sampler runs them. cfg = 1: one
    call on the cond rows and no uncond, as ComfyUI skips it. Returns the calls' outputs."""
    x, ctx, conds = cfg_inputs(family)
    outs = []
    for s in sigmas:
        if cfg == 1.0:
            batch, ctx_b = x, ctx[1:]
            conds_b = {k: v[1:] if torch.is_tensor(v) else v for k, v in conds.items()}
        else:
            batch, ctx_b, conds_b = torch.cat([x, x]), ctx, conds
        v = run_dit(model, batch, s, ctx_b, **conds_b)
        outs.append(v)
        den = batch - v * s
        uncond, cond = (torch.zeros_like(den), den) if cfg == 1.0 else den.chunk(2)
        for fn in model.model_options.get("sampler_post_cfg_function", []):
            fn({"denoised": cond, "cond_denoised": cond, "uncond_denoised": uncond, "cond_scale": cfg,
                "sigma": torch.full((1,), s), "uncond": None if cfg == 1.0 else [{}], "cond": [{}], "input": x})
    return outs


def _policy(model):
    from tomesd_ext.comfy.importance import ImportanceMapHook

    hooks = [f for f in model.model_options.get("sampler_post_cfg_function", []) if isinstance(f, ImportanceMapHook)]
    assert len(hooks) == 1
    return hooks[0].state.policy


@pytest.mark.parametrize("family", FAMILIES)
def test_ratio_zero_exact_and_map_plans_the_next_step(models, family):
    _d, base = models[family]
    ref = cfg_steps(base, family)
    zero = importance_node(base, ratio=0.0)
    for a, b in zip(cfg_steps(zero, family), ref):
        assert torch.equal(a, b)
    model = importance_node(base, ratio=0.5, seed=5)
    assert "sampler_post_cfg_function" not in base.model_options
    out = cfg_steps(model, family)
    policy = _policy(model)
    # step 0 plans with ToMe windows, step 1 from the map of step 0
    assert policy.counts["tome"] > 0 and policy.counts["importance"] == policy.counts["tome"]
    assert policy.hmap.shape[0] == 1 and torch.isfinite(policy.hmap).all()
    tome = cfg_steps(tome_node(base, ratio=0.5, seed=5), family)
    assert torch.equal(out[0], tome[0])  # no map yet: ToMe's partition, the same seed
    assert not torch.allclose(out[1], tome[1], atol=1e-6)  # the map's partition
    assert not torch.allclose(out[1], ref[1], atol=1e-6) and torch.isfinite(out[1]).all()
    for a, b in zip(cfg_steps(base, family), ref):  # the shared model is unchanged
        assert torch.equal(a, b)


def test_split_cond_and_uncond_calls_use_the_same_partition(models):
    """ComfyUI short of memory runs a step's cond and uncond as separate calls: both plan from the
    step's one mean map, so they draw the same destinations."""
    _d, base = models["sd3"]
    model = importance_node(base, ratio=0.5, seed=5)
    cfg_steps(model, "sd3", sigmas=SIGMAS[:1])
    policy = _policy(model)
    x, ctx, conds = cfg_inputs("sd3")
    parts = []
    for i in (1, 0):  # cond first, then uncond
        run_dit(model, x, SIGMAS[1], ctx[i : i + 1], **{k: v[i : i + 1] for k, v in conds.items()})
        parts.append(policy.parts)
    assert policy.counts["importance"] == 2 * policy.counts["tome"] > 0
    (a,), (b,) = parts[0].values(), parts[1].values()
    assert torch.equal(a[0].dst, b[0].dst) and torch.equal(a[0].priority, b[0].priority)


@pytest.mark.parametrize("family, thw, keep_first", [("wan", (5, 7, 9), False), ("wan", (3, 7, 9), True),
                                                     ("wan", (1, 7, 9), False), ("hunyuan", (3, 8, 10), False),
                                                     ("ltxv", (2, 6, 10), False)])
def test_video_map_fits_odd_sizes_one_frame_and_keep_first_frame(models, family, thw, keep_first):
    """The map at the merged token grid: Wan pads a 7x9 latent up to 4x5 tokens; a kept first
    frame is left out of it; one latent frame gives an image map."""
    from tomesd_ext.comfy.importance import apply_importance_patch
    from tomesd_ext.core import ToMeOptions

    _d, base = models[family]
    opts = ToMeOptions.create(ratio=0.5, seed=5, mode="importance", min_tokens=0, keep_first_frame=keep_first)
    model, reason = apply_importance_patch(base, opts)
    assert reason is None
    x, ctx, conds = video_inputs(family, batch=1, thw=thw)
    for s in SIGMAS:
        v = run_dit(model, torch.cat([x, x]), s, torch.cat([ctx, ctx.flip(1)]), **conds)
        uncond, cond = (torch.cat([x, x]) - v * s).chunk(2)
        model.model_options["sampler_post_cfg_function"][0](
            {"denoised": cond, "cond_denoised": cond, "uncond_denoised": uncond, "cond_scale": 4.0,
             "sigma": torch.full((1,), s), "uncond": [{}], "cond": [{}], "input": x})
    policy = _policy(model)
    assert policy.counts["importance"] == policy.counts["tome"] > 0
    pt = 2 if family != "ltxv" else 1
    grid = (thw[0] - keep_first, -(-thw[1] // pt), -(-thw[2] // pt))
    assert policy.hmap.shape == (1, *(grid[1:] if grid[0] == 1 else grid))


def _token_counts(module, call):
    """The sequence lengths ``module`` (taking (B, L, C) first) saw during call()."""
    seen = []
    handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    try:
        call()
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("family", ("sd3", "pixart", "wan"))
def test_attention_sees_half_the_image_tokens(models, family):
    """At ratio 0.5 the importance-planned step's attention input holds half the image tokens
    (text kept): SD3's joint attention (the image stream's qkv), PixArt's self attention, Wan's block."""
    _d, base = models[family]
    dm = base.model.diffusion_model
    module = {"sd3": lambda: dm.joint_blocks[1].x_block.attn.qkv, "pixart": lambda: dm.blocks[1].attn,
              "wan": lambda: dm.blocks[1]}[family]()
    plain = _token_counts(module, lambda: cfg_steps(base, family))
    model = importance_node(base, ratio=0.5, seed=5)
    merged = _token_counts(module, lambda: cfg_steps(model, family))
    x, _ctx, _conds = cfg_inputs(family)
    n_img = x.shape[-2] // 2 * x.shape[-1] // 2 * (x.shape[2] if x.ndim == 5 else 1)
    assert len(plain) == len(merged) == 2
    assert merged == [p - n_img // 2 for p in plain]
    assert _policy(model).counts["importance"] > 0


def test_comfy_sampler_with_cfg(models):
    """ComfyUI's own sampler (CFGGuider, euler, 3 steps) on SD3 and Wan: cond and uncond batched
    by ComfyUI, the map from its post-CFG hook; ratio 0 bit-identical to the unpatched model."""
    import comfy.samplers

    def sample(model, pos, neg, noise):
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(pos, neg)
        guider.set_cfg(4.0)
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", 3)
        return guider.sample(noise.clone(), torch.zeros_like(noise), comfy.samplers.sampler_object("euler"), sigmas,
                             disable_pbar=True, seed=0)

    g = torch.Generator().manual_seed(0)
    for family, latent, extra in (("sd3", (1, 16, 16, 16), lambda: {"pooled_output": torch.randn(1, 16, generator=g)}),
                                  ("wan", (1, 16, 3, 8, 8), dict)):
        _d, base = models[family]
        pos = [[torch.randn(1, 7, 32, generator=g), extra()]]
        neg = [[torch.randn(1, 7, 32, generator=g), extra()]]
        noise = torch.randn(*latent, generator=g)
        ref = sample(base, pos, neg, noise)
        assert torch.equal(sample(importance_node(base, ratio=0.0), pos, neg, noise), ref)
        model = importance_node(base, ratio=0.5, seed=5)
        out = sample(model, pos, neg, noise)
        policy = _policy(model)
        assert policy.counts["importance"] == 2 * policy.counts["tome"] > 0, policy.counts  # steps 1 and 2 use maps
        assert torch.isfinite(out).all() and not torch.allclose(out, ref, atol=1e-4)
        assert not torch.allclose(out, sample(tome_node(base, ratio=0.5, seed=5), pos, neg, noise), atol=1e-4)


def _diffusers_two_calls(d, family, x, ctx, conds, run):
    """apply_tome(mode="importance") on diffusers' model: a CFG call at SIGMAS[0] (its map), then
    one at SIGMAS[1]. Returns (map, unmerged second call, merged second call, its plans)."""
    from tomesd_ext import apply_tome, remove_tome
    from tomesd_ext.diffusers.tome import PATCH_ATTR

    dref = run(SIGMAS[1])
    apply_tome(d, 0.5, seed=5, min_tokens=0, dit_mode="block", mode="importance")
    try:
        policy = d.__dict__[PATCH_ATTR].policy
        run(SIGMAS[0])
        d_map = policy.hmap.clone()
        with recorded_plans() as plans:
            dout = run(SIGMAS[1])
        assert policy.counts["importance"] > 0
    finally:
        remove_tome(d)
    return d_map, dref, dout, plans


@pytest.mark.parametrize("family", ("sd3", "flux", "wan"))
def test_node_matches_diffusers_importance_adapter(models, family):
    """Same weights and calls: the diffusers adapter takes the map from its transformer's output
    (the velocity), the node from ComfyUI's post-CFG x0 predictions / sigma. The maps agree to
    float noise (at the token grid); given the same map, the importance-planned call makes the
    same plans and agrees as the ToMe parity tests do (assert_same_merge)."""
    from tomesd_ext.core import pool_to_grid

    d, base = models[family]
    if family == "wan":
        d = diffusers_wan_from_comfy(base)
    x, ctx, conds = cfg_inputs(family)
    batch = torch.cat([x, x])
    if family == "wan":
        run = lambda s: run_diffusers_wan(d, batch, s, ctx)  # noqa: E731
    else:
        run = lambda s: run_diffusers(d, family, batch, s, ctx, conds)  # noqa: E731
    d_map, dref, dout, d_plans = _diffusers_two_calls(d, family, x, ctx, conds, run)

    model = importance_node(base, ratio=0.5, seed=5)
    policy = _policy(model)
    cfg_steps(model, family, sigmas=SIGMAS[:1])
    c_map = policy.hmap
    if family == "sd3":  # diffusers keeps an image map at its latent size, pooled per call
        d_map = pool_to_grid(d_map, *c_map.shape[1:]).view(c_map.shape)
    assert c_map.shape == d_map.shape
    torch.testing.assert_close(c_map, d_map, rtol=1e-4, atol=1e-5)
    policy.set_map(d_map.clone())  # exactly the same map -> exactly the same partition
    ref = run_dit(base, batch, SIGMAS[1], ctx, **conds)
    with recorded_plans() as c_plans:
        out = run_dit(model, batch, SIGMAS[1], ctx, **conds)
    assert policy.counts["importance"] > 0
    assert_same_merge(ref, out, dref, dout, c_plans, d_plans)


def test_flux_without_cfg_warns_once_and_merges_like_tome(models, caplog):
    """Guidance-distilled Flux runs at cfg 1 (no uncond pass): no map, one warning, ToMe's merge
    exactly, as the diffusers adapter does."""
    _d, base = models["flux"]
    with caplog.at_level(logging.WARNING, logger="tomesd_ext"):
        model = importance_node(base, ratio=0.5, seed=5)
        out = cfg_steps(model, "flux", cfg=1.0) + cfg_steps(model, "flux", cfg=1.0)
    warnings = [r.getMessage() for r in caplog.records if r.name == "tomesd_ext"]
    assert len(warnings) == 1 and "guidance-distilled" in warnings[0], warnings
    assert _policy(model).counts["importance"] == 0
    tome = tome_node(base, ratio=0.5, seed=5)
    for a, b in zip(out, cfg_steps(tome, "flux", cfg=1.0) * 2):
        assert torch.equal(a, b)


def test_unsupported_model_passes_through_with_one_warning(caplog):
    model = fake_dit_model()
    with caplog.at_level(logging.WARNING, logger="tomesd_ext"):
        assert importance_node(model, ratio=0.5) is model
    warnings = [r.getMessage() for r in caplog.records if r.name == "tomesd_ext"]
    assert len(warnings) == 1 and "FakeDiT" in warnings[0] and "Qwen-Image" in warnings[0], warnings


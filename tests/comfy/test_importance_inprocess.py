"""The importance node inside ComfyUI (COMFYUI_PATH), on the tiny SD model: the map taken from
ComfyUI's own sampler (post-CFG hook), parity with the diffusers importance adapter on the same
weights, the cfg = 1 fallback, batch order (cond_or_uncond), ratio 0, replacement."""

import logging

import pytest
import torch

from comfy_env import comfy_model_from_diffusers, import_comfy, importance_node, run_unet, tome_node
from test_inprocess import TINY_HEADS, _tiny_unet

pytestmark = pytest.mark.comfyui


@pytest.fixture(scope="module")
def tiny():
    import_comfy()
    unet = _tiny_unet("tiny")
    return unet, comfy_model_from_diffusers(unet, "sd", TINY_HEADS)


@pytest.fixture(scope="module")
def conds():
    g = torch.Generator().manual_seed(0)
    pos = [[torch.randn(1, 77, 32, generator=g), {}]]
    neg = [[torch.randn(1, 77, 32, generator=g), {}]]
    return pos, neg, torch.randn(2, 4, 16, 16, generator=g)


def _sample(model, conds, cfg=5.0, steps=3):
    """ComfyUI's own CFG sampler (euler, normal schedule) on a batch of 2 latents."""
    import comfy.samplers

    pos, neg, noise = conds
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(pos, neg)
    guider.set_cfg(cfg)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", steps)
    sampler = comfy.samplers.sampler_object("euler")
    return guider.sample(noise.clone(), torch.zeros_like(noise), sampler, sigmas, disable_pbar=True, seed=0)


def _state(model):
    from tomesd_ext.comfy.importance import ImportanceMapHook

    hooks = [f for f in model.model_options.get("sampler_post_cfg_function", []) if isinstance(f, ImportanceMapHook)]
    assert len(hooks) == 1
    return hooks[0].state


def _reorder(order):
    """A model_function_wrapper that runs the sampler's batch in another chunk layout:
    "reversed" (cond first instead of ComfyUI's uncond first) or "split" (one call per chunk)."""

    def wrapper(apply_model, args):
        x, t, c, cou = args["input"], args["timestep"], args["c"], list(args["cond_or_uncond"])
        k = len(cou)

        def call(idx):
            sub = {key: (torch.cat([v.chunk(k)[i] for i in idx]) if torch.is_tensor(v) else v) for key, v in c.items()}
            opts = dict(c["transformer_options"], cond_or_uncond=[cou[i] for i in idx])
            sub["transformer_options"] = opts
            pick = lambda z: torch.cat([z.chunk(k)[i] for i in idx])  # noqa: E731
            return apply_model(pick(x), pick(t), **sub)

        if order == "split":
            return torch.cat([call([i]) for i in range(k)])
        wrapper.seen.append([cou[i] for i in reversed(range(k))])
        out = call(list(reversed(range(k))))
        return torch.cat(list(reversed(out.chunk(k))))

    wrapper.seen = []
    return wrapper


def test_map_from_comfy_sampler_drives_later_steps(tiny, conds):
    _unet, base = tiny
    ref = _sample(base, conds)
    model = importance_node(base, ratio=0.5, seed=5)
    out = _sample(model, conds)
    counts = _state(model).policy.counts
    # 3 steps x 3 merged levels of the tiny model (d = 1, 2, 4 at 16 px; min_tokens 0):
    # step 0 plans with ToMe windows, steps 1 and 2 from the map of the step before
    assert counts == {"tome": 5, "importance": 10}
    assert _state(model).policy.hmap.shape == (2, 16, 16)
    assert torch.isfinite(out).all() and not torch.allclose(out, ref, atol=1e-3)
    # a different map gives a different merge than ToMe windows from step 1 on
    assert not torch.allclose(out, _sample(tome_node(base, ratio=0.5, seed=5), conds), atol=1e-4)


def test_cfg1_falls_back_to_tome_exactly_with_one_warning(tiny, conds, caplog):
    _unet, base = tiny
    model = importance_node(base, ratio=0.5, seed=5, max_downsample="2")
    with caplog.at_level(logging.WARNING, logger="tomesd_ext"):
        out = _sample(model, conds, cfg=1.0)
        again = _sample(model, conds, cfg=1.0)
    warnings = [r for r in caplog.records if r.name == "tomesd_ext"]
    assert len(warnings) == 1 and "cfg = 1" in warnings[0].getMessage()
    assert _state(model).policy.counts["importance"] == 0
    tome = _sample(tome_node(base, ratio=0.5, seed=5, max_downsample="2"), conds, cfg=1.0)
    assert torch.equal(out, tome) and torch.equal(again, tome)


@pytest.mark.parametrize("order", ["reversed", "split"])
def test_batch_order_from_cond_or_uncond(tiny, conds, order):
    _unet, base = tiny
    default = importance_node(base, ratio=0.5, seed=5)
    out_default = _sample(default, conds)
    other = importance_node(base, ratio=0.5, seed=5)
    wrapper = _reorder(order)
    other.set_model_unet_function_wrapper(wrapper)
    out_other = _sample(other, conds)
    assert all(seen == [0, 1] for seen in wrapper.seen) and (order == "split" or wrapper.seen)  # cond first
    calls = 2 if order == "split" else 1  # split: both calls of a step use the previous map
    expected = {k: v * calls for k, v in _state(default).policy.counts.items()}
    assert _state(other).policy.counts == expected
    mine, ref = _state(other).policy, _state(default).policy
    if order == "reversed":  # the same batch, other chunk order: bit-identical
        assert torch.equal(mine.hmap, ref.hmap) and torch.equal(out_other, out_default)
        return
    # split: batch-size float noise (the unpatched model differs by ~5e-4 on outputs of ~70),
    # but the same partitions in the last step
    torch.testing.assert_close(mine.hmap, ref.hmap, rtol=0, atol=1e-4)
    torch.testing.assert_close(out_other, out_default, rtol=0, atol=2e-3)
    assert mine.parts.keys() == ref.parts.keys() and mine.parts
    for key in ref.parts:
        for a, b in zip(mine.parts[key], ref.parts[key]):
            assert torch.equal(a.dst, b.dst) and torch.equal(a.priority, b.priority)


def test_ratio_zero_exact_and_input_untouched(tiny, conds):
    _unet, base = tiny
    ref = _sample(base, conds)
    model = importance_node(base, ratio=0.0, merge_mlp=True, merge_crossattn=True)
    assert torch.equal(_sample(model, conds), ref)
    assert "sampler_post_cfg_function" not in base.model_options
    assert torch.equal(_sample(base, conds), ref)


def test_second_merge_node_replaces_the_first(tiny, conds):
    _unet, base = tiny
    tome = tome_node(importance_node(base, ratio=0.5, seed=1, merge_mlp=True), ratio=0.5, seed=5)
    assert "sampler_post_cfg_function" not in tome.model_options and not tome.object_patches
    assert torch.equal(_sample(tome, conds), _sample(tome_node(base, ratio=0.5, seed=5), conds))
    imp = importance_node(tome_node(base, ratio=0.3, seed=9), ratio=0.5, seed=5)
    assert len(imp.model_options["sampler_post_cfg_function"]) == 1
    assert torch.equal(_sample(imp, conds), _sample(importance_node(base, ratio=0.5, seed=5), conds))


def test_parity_with_diffusers_importance_adapter(tiny):
    """Two CFG calls in both implementations on the same weights: the diffusers adapter takes the
    map from its UNet output (epsilon), ComfyUI from the post-CFG x0 predictions / sigma. The
    maps agree to float noise; with the same map the second (importance-planned) call agrees."""
    from tomesd_ext import apply_tome, remove_tome
    from tomesd_ext.diffusers.tome import PATCH_ATTR

    unet, base = tiny
    g = torch.Generator().manual_seed(3)
    x1, x2 = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 4, 16, 16, generator=g)
    ctx_c, ctx_u = torch.randn(2, 77, 32, generator=g), torch.randn(2, 77, 32, generator=g)
    ctx = torch.cat([ctx_u, ctx_c])
    (t1, s1), (t2, s2) = (700, 4.0), (500, 2.0)
    kw = dict(ratio=0.5, seed=5, merge_crossattn=True)
    with torch.no_grad():
        apply_tome(unet, mode="importance", min_tokens=0, **kw)
        tracker = unet.__dict__[PATCH_ATTR].policy
        unet(torch.cat([x1, x1]), t1, encoder_hidden_states=ctx)
        d_map = tracker.hmap.clone()
        d_out = unet(torch.cat([x2, x2]), t2, encoder_hidden_states=ctx).sample
        assert tracker.counts["importance"] > 0
        remove_tome(unet)
        d_ref = unet(torch.cat([x2, x2]), t2, encoder_hidden_states=ctx).sample

    model = importance_node(base, **kw)
    state = _state(model)
    hook = model.model_options["sampler_post_cfg_function"][0]
    eps = run_unet(model, torch.cat([x1, x1]), t1, ctx, sigma=s1, cond_or_uncond=[1, 0])
    eps_u, eps_c = eps.chunk(2)
    denoised = lambda e: x1 - e * s1  # noqa: E731  (ComfyUI's epsilon calculate_denoised)
    hook({"denoised": denoised(eps_c), "cond_denoised": denoised(eps_c), "uncond_denoised": denoised(eps_u),
          "cond_scale": 7.0, "sigma": torch.full((2,), s1), "uncond": [{}], "cond": [{}], "input": x1})
    torch.testing.assert_close(state.policy.hmap, d_map, rtol=1e-4, atol=1e-5)
    state.policy.set_map(d_map.clone())  # exactly the same map -> exactly the same partition
    c_out = run_unet(model, torch.cat([x2, x2]), t2, ctx, sigma=s2, cond_or_uncond=[1, 0])
    c_ref = run_unet(base, torch.cat([x2, x2]), t2, ctx, sigma=s2)
    assert state.policy.counts["importance"] > 0
    torch.testing.assert_close(c_out, d_out, rtol=1e-4, atol=1e-4)
    delta_c, delta_d = c_out - c_ref, d_out - d_ref
    assert delta_d.norm() > 1e-3
    assert (delta_c - delta_d).norm() / delta_d.norm() < 1e-3
    # the same call with the chunks in the other order (cond first) gives the same rows
    c_swap = run_unet(model, torch.cat([x2, x2]), t2, torch.cat([ctx_c, ctx_u]), sigma=s2, cond_or_uncond=[0, 1])
    c_out2 = run_unet(model, torch.cat([x2, x2]), t2, ctx, sigma=s2, cond_or_uncond=[1, 0])
    torch.testing.assert_close(torch.cat(c_swap.chunk(2)[::-1]), c_out2, rtol=1e-5, atol=1e-5)

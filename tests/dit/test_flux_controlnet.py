"""apply_tome with Flux ControlNet: the transformer merged while a ControlNet adds residuals between
its blocks, and the FluxControlNetModel itself patched (its own family entry)."""

import pytest
import torch

from tomesd_ext import apply_tome, remove_tome

from .dit_models import make

MODES = ("block", "attn", "kv")
H, W, TXT = 12, 10, 7


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def controlnet(num_layers=1, num_single_layers=2, num_mode=None, seed=4):
    """A tiny FluxControlNetModel for the tiny Flux of dit_models (1 double block for its 2, 2 single
    blocks for its 2), with random weights in its zero-initialised output layers too."""
    from diffusers import FluxControlNetModel

    torch.manual_seed(seed)
    cn = FluxControlNetModel(patch_size=1, in_channels=16, num_layers=num_layers, num_single_layers=num_single_layers,
                             attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=16,
                             guidance_embeds=True, axes_dims_rope=[4, 6, 6], num_mode=num_mode)
    with torch.no_grad():
        for layer in [*cn.controlnet_blocks, *cn.controlnet_single_blocks, cn.controlnet_x_embedder]:
            layer.weight.normal_(0, 0.3)
            layer.bias.normal_(0, 0.1)
    return cn.eval()


def cn_inputs(kw, seed=5):
    """The ControlNet's call beside the transformer's call ``kw``: its packed condition tokens."""
    g = torch.Generator().manual_seed(seed)
    cond = torch.randn(kw["hidden_states"].shape, generator=g)
    return dict(kw, controlnet_cond=cond, conditioning_scale=1.0)


def residuals(cn, kw, **extra):
    with torch.no_grad():
        blocks, singles = cn(**cn_inputs(kw), **extra, return_dict=False)
    return dict(controlnet_block_samples=blocks, controlnet_single_block_samples=singles)


def run(m, kw, **extra):
    with torch.no_grad():
        return m(**kw, **extra).sample


@pytest.mark.parametrize("mode", MODES)
def test_merged_transformer_adds_the_residuals_to_every_token(mode):
    m, kw, _ = make("flux", batch=2, h=H, w=W, txt=TXT)
    res = residuals(controlnet(), kw)
    ref_with, ref_without = run(m, kw, **res), run(m, kw)
    ref_effect = ref_with - ref_without
    assert rel(ref_with, ref_without) > 0.1  # the ControlNet matters

    apply_tome(m, 0.0, dit_mode=mode, seed=3, min_tokens=0)
    assert torch.equal(run(m, kw, **res), ref_with)

    apply_tome(m, 0.5, dit_mode=mode, seed=3, min_tokens=0)
    merged_with, merged_without = run(m, kw, **res), run(m, kw)
    assert 0 < rel(merged_without, ref_without) < 0.5  # merging is on
    effect = merged_with - merged_without
    # the ControlNet's effect under merging is the unmerged model's effect, within merging's error
    assert rel(effect, ref_effect) < 0.15  # measured: 0.054 block, 0.021 attn, 0.010 kv
    # every token receives it: no token's effect vanishes where the unmerged model's does not
    per_token, ref_per_token = effect.norm(dim=-1), ref_effect.norm(dim=-1)
    assert (per_token > 0.5 * ref_per_token).all()

    # a residual after the last block, on one token only, changes that token's output only
    last = [torch.zeros_like(s) for s in res["controlnet_single_block_samples"]]
    last[-1][:, 37] = 5.0
    one = dict(controlnet_block_samples=[torch.zeros_like(s) for s in res["controlnet_block_samples"]],
               controlnet_single_block_samples=last)
    changed = (run(m, kw, **one) - merged_without).abs().amax(dim=-1) > 0
    assert changed[:, 37].all() and changed.sum() == changed.shape[0]

    remove_tome(m)
    assert torch.equal(run(m, kw, **res), ref_with) and torch.equal(run(m, kw), ref_without)


def test_xlabs_style_repeated_residuals_under_merging():
    # controlnet_blocks_repeat (XLabs ControlNets): the residuals cycle over the double blocks
    m, kw, _ = make("flux", batch=1, h=H, w=W, txt=TXT)
    res = residuals(controlnet(num_layers=1, num_single_layers=0), kw)
    ref = run(m, kw, **res, controlnet_blocks_repeat=True)
    apply_tome(m, 0.0, seed=0, min_tokens=0)
    assert torch.equal(run(m, kw, **res, controlnet_blocks_repeat=True), ref)
    apply_tome(m, 0.5, seed=0, min_tokens=0)
    out = run(m, kw, **res, controlnet_blocks_repeat=True)
    assert out.shape == ref.shape and 0 < rel(out, ref) < 0.5
    remove_tome(m)
    assert torch.equal(run(m, kw, **res, controlnet_blocks_repeat=True), ref)


def _attention_lengths(model):
    seen = []
    for mod in model.modules():
        if type(mod).__name__ == "FluxAttention":
            mod.register_forward_pre_hook(
                lambda mod, args, kwargs: seen.append(kwargs.get("hidden_states", args[0] if args else None).shape[1]),
                with_kwargs=True,
            )
    return seen


@pytest.mark.parametrize("mode", MODES)
def test_controlnet_itself_merges_and_its_residuals_keep_every_token(mode):
    m, kw, _ = make("flux", batch=2, h=H, w=W, txt=TXT)
    cn = controlnet()
    ref = residuals(cn, kw)
    apply_tome(cn, 0.0, dit_mode=mode, seed=1, min_tokens=0)
    out = residuals(cn, kw)
    assert all(torch.equal(a, b) for k in ref for a, b in zip(out[k], ref[k]))

    apply_tome(cn, 0.5, dit_mode=mode, seed=1, min_tokens=0)
    seen = _attention_lengths(cn)
    out = residuals(cn, kw)
    n = H * W
    if mode in ("block", "attn"):  # double block: the image stream merged; single blocks: text + merged image
        assert seen == [n - n // 2, TXT + n - n // 2, TXT + n - n // 2]
    else:  # kv: queries keep every token
        assert seen == [n, TXT + n, TXT + n]
    for k in ref:
        assert [t.shape for t in out[k]] == [t.shape for t in ref[k]]  # full length: (B, h*w, D)
        for a, b in zip(out[k], ref[k]):
            assert torch.isfinite(a).all() and 0 < rel(a, b) < 0.5
    # the transformer (unmerged) on the merged ControlNet's residuals stays near its unmerged output
    ref_out, out_out = run(m, kw, **ref), run(m, kw, **out)
    assert 0 < rel(out_out, ref_out) < 0.2

    remove_tome(cn)
    out = residuals(cn, kw)
    assert all(torch.equal(a, b) for k in ref for a, b in zip(out[k], ref[k]))


@pytest.mark.parametrize("mode", MODES)
def test_both_merged_in_one_step(mode):
    m, kw, _ = make("flux", batch=2, h=H, w=W, txt=TXT)
    cn = controlnet()
    ref = run(m, kw, **residuals(cn, kw))
    apply_tome(m, 0.5, dit_mode=mode, seed=2, min_tokens=0)
    apply_tome(cn, 0.5, dit_mode=mode, seed=2, min_tokens=0)
    out = run(m, kw, **residuals(cn, kw))
    assert out.shape == ref.shape and 0 < rel(out, ref) < 0.5
    remove_tome(m)
    remove_tome(cn)
    assert torch.equal(run(m, kw, **residuals(cn, kw)), ref)


@pytest.mark.parametrize("mode", MODES)
def test_union_controlnet_mode_token_counts_as_text(mode):
    # ControlNet-Union prepends the embedding of controlnet_mode to the text: merged, it must equal
    # a plain ControlNet called with that embedding as its first text token (same weights, same plan)
    _, kw, _ = make("flux", batch=1, h=H, w=W, txt=TXT)
    union = controlnet(num_mode=3)
    plain = controlnet()
    plain.load_state_dict(union.state_dict(), strict=False)
    g = torch.Generator().manual_seed(9)
    token = torch.randn(1, 1, 24, generator=g)
    with torch.no_grad():
        union.controlnet_mode_embedder.weight[2] = union.context_embedder(token)[0, 0]
    mode_kw = dict(kw, controlnet_mode=torch.tensor([[2]]))
    plain_kw = dict(kw, encoder_hidden_states=torch.cat([token, kw["encoder_hidden_states"]], 1),
                    txt_ids=torch.cat([kw["txt_ids"][:1], kw["txt_ids"]]))
    for model in (union, plain):
        apply_tome(model, 0.5, dit_mode=mode, seed=6, min_tokens=0)
    a, b = residuals(union, mode_kw), residuals(plain, plain_kw)
    for k in a:
        for x, y in zip(a[k], b[k]):
            assert rel(x, y) < 1e-5  # measured 2e-8; with the mode token counted as image: 3e-3
    remove_tome(union)
    assert all(rel(x, y) > 1e-4 for k in a for x, y in zip(residuals(union, mode_kw)[k], a[k]))  # merging was on


def test_controlnet_importance_mode_plans_with_windows_and_no_warning(recwarn):
    _, kw, _ = make("flux", batch=2, h=H, w=W, txt=TXT)
    cn = controlnet()
    apply_tome(cn, 0.5, mode="importance", seed=0, min_tokens=0)
    policy = cn._tomesd_ext_patch.policy
    for step in (0.9, 0.8):
        out = residuals(cn, dict(kw, timestep=torch.full((2,), step)))
        assert all(torch.isfinite(t).all() for v in out.values() for t in v)
    assert policy.counts["importance"] == 0 and policy.counts["tome"] > 0
    assert not [w for w in recwarn if "tomesd" in str(w.message) or "guidance" in str(w.message)]


def test_a_pipeline_patches_its_transformer_not_its_controlnet():
    class Pipe:  # what apply_tome reads of FluxControlNetPipeline: `transformer` (and `controlnet`)
        pass

    pipe = Pipe()
    pipe.transformer, kw, _ = make("flux", batch=1, h=H, w=W, txt=TXT)
    pipe.controlnet = controlnet()
    apply_tome(pipe, 0.5, seed=0, min_tokens=0)
    assert hasattr(pipe.transformer, "_tomesd_ext_patch") and not hasattr(pipe.controlnet, "_tomesd_ext_patch")
    remove_tome(pipe)


def test_multi_controlnet_is_refused_with_a_pointer_to_its_nets():
    from diffusers import FluxMultiControlNetModel

    multi = FluxMultiControlNetModel([controlnet(), controlnet(seed=5)])
    with pytest.raises(TypeError, match=r"FluxMultiControlNetModel.*each of its \.nets"):
        apply_tome(multi, 0.5)
    for net in multi.nets:  # what the message says works
        apply_tome(net, 0.5, seed=0, min_tokens=0)
        remove_tome(net)

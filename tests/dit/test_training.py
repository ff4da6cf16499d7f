"""apply_tome while training: gradient checkpointing recomputes a block during backward, after the
denoiser call ended; the recomputation must merge exactly as the forward did (same plan), for the
transformers in every dit_mode and for the UNet."""

import pytest
import torch

from tomesd_ext import apply_tome, remove_tome
from tomesd_ext.models import build_unet

from .dit_models import FAMILIES, VIDEO_FAMILIES, make, make_video

MODES = ("block", "attn", "kv")


def build(family):
    m, kw, sample = (make_video if family in VIDEO_FAMILIES else make)(family)
    return m.train(), kw, sample


def grads(m, kw, sample):
    """The output and the parameter gradients of one training step (loss: mean square output)."""
    m.zero_grad(set_to_none=True)
    out = sample(m(**kw))
    out.pow(2).mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def checkpointing(m, on):
    if on:
        m.enable_gradient_checkpointing()
    else:
        m.disable_gradient_checkpointing()


def assert_same(a, b, exact=True):
    assert a.keys() == b.keys()
    for name in a:
        if exact:
            assert torch.equal(a[name], b[name]), name
        else:
            torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("family", FAMILIES + VIDEO_FAMILIES)
@pytest.mark.parametrize("mode", MODES)
def test_gradient_checkpointing_recomputes_the_forwards_merge(family, mode):
    m, kw, sample = build(family)
    ref_out, ref = grads(m, kw, sample)  # unpatched, no checkpointing
    checkpointing(m, True)
    assert_same(grads(m, kw, sample)[1], ref)  # checkpointing alone changes nothing here

    # ratio 0 merges nothing: the same gradients, bit for bit
    apply_tome(m, ratio=0.0, min_tokens=0, dit_mode=mode, seed=1)
    out, got = grads(m, kw, sample)
    assert torch.equal(out, ref_out)
    assert_same(got, ref)

    # ratio 0.5: with checkpointing as without it (the recomputation replays the forward's plan)
    apply_tome(m, ratio=0.5, min_tokens=0, dit_mode=mode, seed=1)
    merged_out, merged = grads(m, kw, sample)
    assert not torch.equal(merged_out, ref_out)
    checkpointing(m, False)
    plain_out, plain = grads(m, kw, sample)
    assert torch.equal(merged_out, plain_out)
    assert_same(merged, plain, exact=False)

    # after the backward passes, plain calls merge as before; removal restores the model exactly
    checkpointing(m, True)
    with torch.no_grad():
        assert torch.equal(sample(m(**kw)), merged_out)
    remove_tome(m)
    out, got = grads(m, kw, sample)
    assert torch.equal(out, ref_out)
    assert_same(got, ref)


def test_recomputation_finds_the_plan_of_its_own_call():
    # two calls with different inputs, then one backward through both: each block recomputation
    # replays the plan of the call it belongs to
    m, kw, sample = build("flux")
    apply_tome(m, ratio=0.5, min_tokens=0, dit_mode="block", seed=1)
    kw2 = dict(kw, hidden_states=kw["hidden_states"].flip(1), timestep=kw["timestep"] * 0.5)

    def step():
        m.zero_grad(set_to_none=True)
        (sample(m(**kw)).pow(2).mean() + sample(m(**kw2)).abs().mean()).backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    plain = step()
    checkpointing(m, True)
    assert_same(step(), plain, exact=False)


@pytest.mark.parametrize("reentrant", [False, True])
def test_custom_checkpoint_functions(reentrant):
    # a checkpoint function of the user's (reentrant: torch recomputes from detached inputs)
    m, kw, sample = build("wan")
    apply_tome(m, ratio=0.5, min_tokens=0, dit_mode="attn", seed=1)
    kw = dict(kw, hidden_states=kw["hidden_states"].requires_grad_())  # reentrant checkpoints need an input with grad
    plain = grads(m, kw, sample)[1]

    def ckpt(module, *args):
        return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=reentrant)

    m.enable_gradient_checkpointing(ckpt)
    assert_same(grads(m, kw, sample)[1], plain, exact=False)


def unet_grads(unet, inputs):
    sample, t, text = inputs
    unet.zero_grad(set_to_none=True)
    out = unet(sample, t, encoder_hidden_states=text).sample
    out.pow(2).mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("options", [{}, {"merge_crossattn": True, "merge_mlp": True}, {"unet_mode": "block"}])
def test_unet_gradient_checkpointing(options):
    unet = build_unet("tiny", seed=0).train()
    g = torch.Generator().manual_seed(0)
    cfg = unet.config
    inputs = (torch.randn(2, cfg.in_channels, 16, 16, generator=g), torch.tensor(500),
              torch.randn(2, 7, cfg.cross_attention_dim, generator=g))
    ref_out, ref = unet_grads(unet, inputs)
    unet.enable_gradient_checkpointing()
    apply_tome(unet, ratio=0.0, min_tokens=0, seed=1, **options)
    out, got = unet_grads(unet, inputs)
    assert torch.equal(out, ref_out)
    assert_same(got, ref)

    apply_tome(unet, ratio=0.5, min_tokens=0, seed=1, **options)
    merged_out, merged = unet_grads(unet, inputs)
    assert not torch.equal(merged_out, ref_out)
    unet.disable_gradient_checkpointing()
    plain_out, plain = unet_grads(unet, inputs)
    assert torch.equal(merged_out, plain_out)
    assert_same(merged, plain, exact=False)
    remove_tome(unet)
    out, got = unet_grads(unet, inputs)
    assert torch.equal(out, ref_out)
    assert_same(got, ref)

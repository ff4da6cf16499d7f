"""apply_vidtome / remove_vidtome on the tiny SD1.x UNet."""

import pytest
import torch

from tomesd_ext import apply_vidtome, remove_vidtome
from tomesd_ext.core import OptionError
from tomesd_ext.diffusers import vidtome_state
from tomesd_ext.diffusers.vidtome import VidToMeAttnProcessor
from tomesd_ext.models import build_unet


@pytest.fixture(scope="module")
def unet():
    return build_unet("tiny", seed=0).eval()


def _inputs(unet, frames=4, samples=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    s = cfg.sample_size
    lat = torch.randn(frames, cfg.in_channels, s, s, generator=g)
    sample = torch.cat([lat] * samples)  # sample-major: the same latents for uncond and cond
    text = torch.randn(samples, 7, cfg.cross_attention_dim, generator=g).repeat_interleave(frames, 0)
    return sample, text


def _run(unet, sample, text, t=500):
    with torch.no_grad():
        return unet(sample, torch.tensor(t), encoder_hidden_states=text).sample


def test_remove_restores_bit_identically(unet):
    sample, text = _inputs(unet)
    before = [m.processor for n, m in unet.named_modules() if n.endswith("attn1")]
    ref = _run(unet, sample, text)
    apply_vidtome(unet, seed=1)
    assert all(isinstance(m.processor, VidToMeAttnProcessor) for n, m in unet.named_modules() if n.endswith("attn1"))
    merged = _run(unet, sample, text)
    assert not torch.equal(merged, ref)
    apply_vidtome(unet, seed=2)  # re-apply replaces, never stacks
    assert not isinstance(unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.processor.inner, VidToMeAttnProcessor)
    remove_vidtome(unet)
    after = [m.processor for n, m in unet.named_modules() if n.endswith("attn1")]
    assert all(a is b for a, b in zip(before, after))
    assert torch.equal(_run(unet, sample, text), ref)
    remove_vidtome(unet)  # no-op


def test_zero_ratios_on_single_frames_are_exact(unet):
    """With one frame per call and nothing merged, attention is the plain per-frame attention."""
    sample, text = _inputs(unet, frames=1)
    ref = _run(unet, sample, text)
    apply_vidtome(unet, local_ratio=0.0, global_ratio=0.0, seed=0)
    try:
        assert torch.equal(_run(unet, sample, text), ref)
    finally:
        remove_vidtome(unet)


def test_deterministic_with_seed(unet):
    sample, text = _inputs(unet)
    outs = []
    for seed in (5, 5, 6):
        apply_vidtome(unet, seed=seed)
        outs.append(_run(unet, sample, text))
        remove_vidtome(unet)
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])


def test_global_set_carried_within_step_and_reset_each_step(unet):
    sample, text = _inputs(unet)
    apply_vidtome(unet, seed=0)
    try:
        st = vidtome_state(unet)
        st.set_chunk([0, 1, 2, 3], n_samples=2)
        _run(unet, sample, text, t=900)
        first = {k: v.clone() for k, v in st.globals.items()}
        assert first  # one set per merged block
        # the same chunk again in the same step sees the global set: a different result
        out_with = _run(unet, sample, text, t=900)
        st.globals.clear()
        st._globals_step = 900.0
        out_fresh = _run(unet, sample, text, t=900)
        assert not torch.equal(out_with, out_fresh)
        # a new step starts with no global set: same as a fresh call
        out_next = _run(unet, sample, text, t=880)
        st.globals.clear()
        st._globals_step = 880.0
        assert torch.equal(out_next, _run(unet, sample, text, t=880))
    finally:
        remove_vidtome(unet)


def test_cond_and_uncond_share_matches(unet):
    """With align_batch the merge map has no sample dimension: identical halves stay identical."""
    sample, _ = _inputs(unet)
    text = torch.randn(1, 7, unet.config.cross_attention_dim).expand(8, -1, -1).contiguous()
    from tomesd_ext.core import temporal

    maps = []
    orig = temporal._replace_from_matches

    def spy(*a, **k):
        plan = orig(*a, **k)
        maps.append(plan.rep.shape[0])
        return plan

    temporal._replace_from_matches = spy
    apply_vidtome(unet, seed=0)
    try:
        out = _run(unet, sample, text)
    finally:
        temporal._replace_from_matches = orig
        remove_vidtome(unet)
    assert maps and set(maps) == {1}
    assert torch.equal(out[:4], out[4:])


def test_only_self_attention_wrapped_and_options_checked(unet):
    apply_vidtome(unet, seed=0)
    try:
        for name, m in unet.named_modules():
            if name.endswith("attn2"):
                assert not isinstance(m.processor, VidToMeAttnProcessor)
    finally:
        remove_vidtome(unet)
    with pytest.raises(OptionError, match="global_ratio"):
        apply_vidtome(unet, global_ratio=1.5)
    assert vidtome_state(unet) is None

"""A patched model keeps diffusers' and torch's contracts: copy and pickle, processor swaps
(set_attn_processor, set_default_attn_processor, the IP-Adapter loader's rebuild by class,
fuse/unfuse_qkv_projections, attention slicing), save/load, removal in any order, and clear
errors for concurrent use and for a model tomesd already patched."""

import copy
import logging
import pickle
import threading

import pytest
import torch

from tomesd_ext import apply_tome, apply_vidtome, remove_tome, remove_vidtome
from tomesd_ext.diffusers.processors import MergedAttnProcessor
from tomesd_ext.models import build_unet

from conftest import run, unet_inputs


@pytest.fixture
def unet():
    return build_unet("tiny", seed=0).eval()


def _calls(unet, inputs, steps=(900, 500)):
    sample, _t, text, kwargs = inputs
    with torch.no_grad():
        return [unet(sample, torch.tensor(t), encoder_hidden_states=text, **kwargs).sample for t in steps]


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("kw", [dict(ratio=0.5, seed=1), dict(ratio=0.5, seed=2, mode="importance", reuse="level", reuse_steps=2)])
def test_deepcopy_and_pickle_behave_like_a_fresh_patch(unet, kw):
    sample, t, text, extra = unet_inputs(unet)
    inputs = (torch.cat([sample[:1], sample[:1]]), t, text, extra)  # a CFG pair: importance has a map
    twin = copy.deepcopy(unet)
    apply_tome(unet, **kw)
    _calls(unet, inputs)  # the original has run: its state must not leak into the copies
    copied = copy.deepcopy(unet)
    loaded = pickle.loads(pickle.dumps(unet))
    apply_tome(twin, **kw)
    fresh = _calls(twin, inputs)
    assert _same(_calls(copied, inputs), fresh)
    assert _same(_calls(loaded, inputs), fresh)
    remove_tome(copied)  # removing from the copy leaves the original patched
    assert not copied._forward_pre_hooks and unet._forward_pre_hooks
    assert _same(_calls(unet, inputs), fresh)


def _same_after(unet, inputs, change):
    """change(model) after apply_tome == change(model) before apply_tome (merging stays on)."""
    twin = copy.deepcopy(unet)
    apply_tome(unet, 0.5, seed=3)
    change(unet)
    after = run(unet, inputs)
    change(twin)
    apply_tome(twin, 0.5, seed=3)
    assert torch.equal(after, run(twin, inputs))
    remove_tome(twin)
    assert not torch.equal(after, run(twin, inputs))  # it did merge
    return after


def test_set_default_attn_processor_keeps_merging(unet):
    _same_after(unet, unet_inputs(unet), lambda m: m.set_default_attn_processor())
    assert all(isinstance(p, MergedAttnProcessor) for n, p in unet.attn_processors.items() if "attn1" in n)


def test_set_attn_processor_and_slicing_keep_merging(unet):
    from diffusers.models.attention_processor import AttnProcessor

    inputs = unet_inputs(unet)
    _same_after(unet, inputs, lambda m: m.set_attn_processor(AttnProcessor()))
    _same_after(build_unet("tiny", seed=0).eval(), inputs, lambda m: m.set_attention_slice(1))


def test_processor_rebuilt_by_class_as_the_ip_adapter_loader_does(unet):
    """diffusers' IP-Adapter loader rebuilds self-attention processors with processor.__class__()."""
    inputs = unet_inputs(unet)

    def rebuild(m):
        m.set_attn_processor({name: proc.__class__() for name, proc in m.attn_processors.items()})

    _same_after(unet, inputs, rebuild)


def test_fuse_and_unfuse_qkv_projections_keep_merging(unet):
    inputs = unet_inputs(unet)
    apply_tome(unet, 0.5, seed=4)
    merged = run(unet, inputs)
    unet.fuse_qkv_projections()
    fused = run(unet, inputs)
    torch.testing.assert_close(fused, merged, rtol=1e-4, atol=1e-5)  # fused GEMMs: float noise only
    unet.unfuse_qkv_projections()
    assert torch.equal(run(unet, inputs), merged)
    remove_tome(unet)
    assert not torch.allclose(run(unet, inputs), merged, atol=1e-4)


def test_save_and_load_of_a_patched_model(unet, tmp_path):
    from diffusers import UNet2DConditionModel

    inputs = unet_inputs(unet)
    keys = list(unet.state_dict())
    apply_tome(unet, 0.5, seed=5)
    assert list(unet.state_dict()) == keys
    unet.save_pretrained(tmp_path)
    loaded = UNet2DConditionModel.from_pretrained(tmp_path).eval()
    remove_tome(unet)
    assert torch.equal(run(loaded, inputs), run(unet, inputs))  # weights only; the patch is not saved


@pytest.mark.parametrize("first", ["tome", "vidtome"])
def test_nested_patches_come_off_in_any_order(unet, first):
    inputs = unet_inputs(unet, batch=4)
    base = run(unet, inputs)
    apply_vidtome(unet, seed=0)
    vid_only = run(unet, inputs)
    remove_vidtome(unet)
    apply_tome(unet, 0.5, seed=6)
    tome_only = run(unet, inputs)
    apply_vidtome(unet, seed=0)
    if first == "tome":
        remove_tome(unet)
        assert torch.equal(run(unet, inputs), vid_only)  # no stale ToMe wrapper left inside
        remove_vidtome(unet)
    else:
        remove_vidtome(unet)
        assert torch.equal(run(unet, inputs), tome_only)
        remove_tome(unet)
    assert torch.equal(run(unet, inputs), base)
    assert not unet._forward_pre_hooks and not unet._forward_hooks


def test_concurrent_call_from_another_thread_is_refused(unet):
    inputs = unet_inputs(unet)
    apply_tome(unet, 0.5, seed=7)
    errors, other, started = [], unet_inputs(unet, hw=(16, 16)), []

    def call_from_thread(module, args):
        if not started:
            started.append(True)

            def other_call():
                try:
                    run(unet, other)
                except RuntimeError as e:
                    errors.append(str(e))

            t = threading.Thread(target=other_call)
            t.start()
            t.join()

    block = next(m for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock")
    handle = block.register_forward_pre_hook(call_from_thread)
    try:
        run(unet, inputs)
    finally:
        handle.remove()
    assert errors and "another thread" in errors[0]
    ref = copy.deepcopy(unet)
    assert torch.equal(run(unet, other), run(ref, other))  # the refused call left no state behind


def test_model_patched_by_tomesd_is_refused(unet):
    tomesd = pytest.importorskip("tomesd")
    tomesd.apply_patch(unet, ratio=0.75, max_downsample=1)
    hooks = dict(unet._forward_pre_hooks)
    with pytest.raises(TypeError, match="tomesd"):
        apply_tome(unet, 0.5, max_downsample=2)
    assert not hasattr(unet, "_tomesd_ext_patch") and dict(unet._forward_pre_hooks) == hooks


def test_failed_apply_vidtome_leaves_no_hook():
    from diffusers import UNet2DConditionModel

    plain = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        mid_block_type=None, cross_attention_dim=16,
    )
    with pytest.raises(TypeError, match="no self-attention"):
        apply_vidtome(plain)
    assert not plain._forward_pre_hooks and not plain._forward_hooks


def test_auto_skip_is_said_once(unet, caplog, monkeypatch):
    monkeypatch.setattr("tomesd_ext.core.options.MIN_TOKENS_DEFAULT", 2048)
    inputs = unet_inputs(unet)
    with caplog.at_level(logging.WARNING, logger="tomesd_ext"):
        apply_tome(unet, 0.5, seed=8)
        base = run(unet, inputs)
        run(unet, inputs)
    said = [r.getMessage() for r in caplog.records if r.name == "tomesd_ext"]
    assert len(said) == 1 and "min_tokens=2048" in said[0] and "min_tokens=0" in said[0]
    remove_tome(unet)
    assert torch.equal(run(unet, inputs), base)  # nothing was merged


def test_bad_kernel_setting_is_refused_at_apply_time(unet, monkeypatch):
    from tomesd_ext import kernels

    monkeypatch.setenv("TOMESD_EXT_KERNELS", "bogus")
    kernels.reset()
    try:
        with pytest.raises(ValueError, match="TOMESD_EXT_KERNELS"):
            apply_tome(unet, 0.5)
        assert not hasattr(unet, "_tomesd_ext_patch") and not unet._forward_pre_hooks
    finally:
        monkeypatch.delenv("TOMESD_EXT_KERNELS")
        kernels.reset()


def _ip_adapter_state_dict(unet, tokens=4):
    """Random IP-Adapter weights in the layout diffusers' loader reads: "image_proj" (a linear
    projection of the image embedding to `tokens` text-sized tokens, LayerNorm) and "ip_adapter"
    (to_k_ip / to_v_ip of every cross-attention, keyed 1, 3, 5, ...)."""
    g = torch.Generator().manual_seed(0)
    cross = unet.config.cross_attention_dim
    ip = {}
    key = 1
    for name, module in unet.named_modules():
        if name.endswith("attn2"):
            hidden = module.to_q.in_features
            ip[f"{key}.to_k_ip.weight"] = torch.randn(hidden, cross, generator=g) * 0.1
            ip[f"{key}.to_v_ip.weight"] = torch.randn(hidden, cross, generator=g) * 0.1
            key += 2
    proj = {"proj.weight": torch.randn(tokens * cross, cross, generator=g) * 0.1, "proj.bias": torch.zeros(tokens * cross),
            "norm.weight": torch.ones(cross), "norm.bias": torch.zeros(cross)}
    return {"image_proj": proj, "ip_adapter": ip}


def test_ip_adapter_loaded_after_apply_tome_keeps_merging(unet):
    """The loader rebuilds every processor (by class for self-attention, IP-Adapter processors for
    cross-attention): the patched model then equals a model that loaded it before apply_tome."""
    sample, t, text, _ = unet_inputs(unet)
    image = torch.randn(2, 1, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))

    def ip_run(m):
        with torch.no_grad():
            return m(sample, t, encoder_hidden_states=text, added_cond_kwargs={"image_embeds": [image]}).sample

    twin = copy.deepcopy(unet)
    apply_tome(unet, 0.5, seed=9, merge_crossattn=True)
    unet._load_ip_adapter_weights([_ip_adapter_state_dict(unet)])
    after = ip_run(unet)
    twin._load_ip_adapter_weights([_ip_adapter_state_dict(twin)])
    unmerged = ip_run(twin)
    apply_tome(twin, 0.5, seed=9, merge_crossattn=True)
    assert torch.equal(after, ip_run(twin))
    assert not torch.equal(after, unmerged)
    keys = set(twin.state_dict())
    remove_tome(unet)
    assert set(unet.state_dict()) == keys and torch.equal(ip_run(unet), unmerged)

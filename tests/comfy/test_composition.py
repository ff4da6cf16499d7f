"""Our ComfyUI node composes with what else a workflow puts on the model (COMFYUI_PATH, tiny
models): a LoRA loaded by ComfyUI's own LoRA loader (before or after our node, also on the
feed-forward our merge_mlp object patch wraps), a ControlNet through ComfyUI's sampler, and
another node's attention patch."""

import pytest
import torch

from comfy_env import run_unet, tome_node
from test_inprocess import _inputs, _ours, comfy, tiny  # noqa: F401  (fixtures)

pytestmark = pytest.mark.comfyui

LORA_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2")


def _kohya_lora(unet, rank=4, scale=0.5, seed=7):
    """A LoRA state dict in the kohya format (lora_unet_<diffusers key>.lora_up/down/alpha) on the
    self-attention and feed-forward weights of every transformer block."""
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for key, weight in unet.state_dict().items():
        if not key.endswith(".weight") or not any(f".{t}.weight" in key for t in LORA_TARGETS):
            continue
        name = "lora_unet_" + key[: -len(".weight")].replace(".", "_")
        out_f, in_f = weight.shape
        lora[f"{name}.lora_down.weight"] = torch.randn(rank, in_f, generator=g) * scale / in_f**0.5
        lora[f"{name}.lora_up.weight"] = torch.randn(out_f, rank, generator=g) * scale / rank**0.5
        lora[f"{name}.alpha"] = torch.tensor(float(rank))
    return lora


def _with_lora(model, lora):
    import comfy.sd

    patched, _clip = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)
    return patched


def test_lora_before_or_after_our_node_gives_one_result(tiny):
    unet, base = tiny
    lora = _kohya_lora(unet)
    x, ctx = _inputs()
    lora_only = run_unet(_with_lora(base, lora), x, 500, ctx)
    assert not torch.allclose(lora_only, run_unet(base, x, 500, ctx), atol=1e-3)  # the LoRA applies
    for kw in ({}, {"merge_mlp": True, "merge_crossattn": True}):
        after = _with_lora(tome_node(base, ratio=0.5, seed=2, **kw), lora)
        before = tome_node(_with_lora(base, lora), ratio=0.5, seed=2, **kw)
        assert before.patches and after.patches  # the LoRA's weight patches survive our node
        out_after, out_before = run_unet(after, x, 500, ctx), run_unet(before, x, 500, ctx)
        assert torch.equal(out_after, out_before), kw
        assert not torch.allclose(out_before, run_unet(tome_node(base, ratio=0.5, seed=2, **kw), x, 500, ctx), atol=1e-3)
        # ratio 0 on a LoRA model (merge_mlp's object patch wraps the LoRA-patched ff): the LoRA result
        assert torch.equal(run_unet(tome_node(_with_lora(base, lora), ratio=0.0, **kw), x, 500, ctx), lora_only), kw


def _tiny_controlnet(base, seed=3):
    """A ComfyUI ControlNet (comfy.cldm ControlNet + the ControlNet wrapper the sampler uses)
    shaped like the tiny UNet, with seeded random weights (zero convs not zero, so it acts)."""
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.ops

    config = dict(base.model.model_config.unet_config)
    config.pop("out_channels", None)
    config.update(hint_channels=3, operations=comfy.ops.disable_weight_init, dtype=torch.float32, device=torch.device("cpu"))
    net = comfy.cldm.cldm.ControlNet(**config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.2 / max(1, p[0].numel()) ** 0.5))
    cpu = torch.device("cpu")
    return comfy.controlnet.ControlNet(net, load_device=cpu, manual_cast_dtype=None)


def _sample(model, positive, negative, size=128, steps=2, seed=4):
    import comfy.sample

    latent = torch.zeros(1, 4, size // 8, size // 8)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
    return comfy.sample.sample(model, noise, steps, 5.0, "euler", "normal", positive, negative, latent,
                               disable_pbar=True, seed=seed)


def test_controlnet_through_the_sampler(tiny):
    _unet, base = tiny
    g = torch.Generator().manual_seed(5)
    ctx_pos, ctx_neg = torch.randn(1, 77, 32, generator=g), torch.randn(1, 77, 32, generator=g)
    hint = torch.rand(1, 3, 128, 128, generator=g)
    control = _tiny_controlnet(base).copy().set_cond_hint(hint, 1.0, (0.0, 1.0))
    plain = ([[ctx_pos, {}]], [[ctx_neg, {}]])
    controlled = ([[ctx_pos, {"control": control}]], [[ctx_neg, {"control": control}]])

    ref = _sample(base, *controlled)
    assert not torch.allclose(ref, _sample(base, *plain), atol=1e-3)  # the ControlNet acts
    assert torch.equal(_sample(tome_node(base, ratio=0.0), *controlled), ref)  # ratio 0: exact
    merged = _sample(tome_node(base, ratio=0.5, seed=1), *controlled)
    assert torch.isfinite(merged).all()
    assert not torch.allclose(merged, ref, atol=1e-4)  # merging acts with the ControlNet on
    assert not torch.allclose(merged, _sample(tome_node(base, ratio=0.5, seed=1), *plain), atol=1e-3)


def test_another_nodes_attention_patch_is_kept_and_composes(tiny):
    _unet, base = tiny
    x, ctx = _inputs()
    calls = []

    def scale_queries(n, context, value, extra_options):
        """Another custom node's attn1 patch: scales the query input (commutes with merging)."""
        calls.append(n.shape[1])
        return n * 1.5, context, value

    other = base.clone()
    other.set_model_attn1_patch(scale_queries)
    reference = run_unet(other, x, 500, ctx)
    twice = tome_node(tome_node(other, ratio=0.3, seed=9), ratio=0.0)
    assert _ours(twice)["attn1_patch"] == 2  # the other patch and ours (the first of ours replaced)
    calls.clear()
    assert torch.equal(run_unet(twice, x, 500, ctx), reference)
    assert calls  # the other patch still ran
    merged = run_unet(tome_node(other, ratio=0.5, seed=9), x, 500, ctx)
    assert not torch.allclose(merged, reference, atol=1e-4)
    assert not torch.allclose(merged, run_unet(tome_node(base, ratio=0.5, seed=9), x, 500, ctx), atol=1e-4)

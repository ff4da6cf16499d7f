"""Tiny random-weight image transformers for the ComfyUI DiT tests: built in diffusers
(FluxTransformer2DModel, SD3Transformer2DModel), loaded into ComfyUI's own classes through
ComfyUI's diffusers-key conversion (``convert_diffusers_mmdit``), so both run the same weights."""

from __future__ import annotations

from contextlib import contextmanager

import torch

FLUX = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
            axes_dims_rope=(4, 6, 6))
# ComfyUI reads an MMDiT's width as 64 * depth with head width 64: depth 2 = 2 heads of 64
SD3 = dict(sample_size=16, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=64, num_attention_heads=2,
           joint_attention_dim=32, caption_projection_dim=128, pooled_projection_dim=16, out_channels=16,
           pos_embed_max_size=24)
# what ComfyUI's detection fixes for the full-size models, set for the tiny ones
SCALE = 0.2
COMFY_OVERRIDES = {"flux": {"num_heads": 2, "axes_dim": [4, 6, 6]}, "sd3": {}}


def tiny_diffusers(family: str, seed: int = 0):
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    torch.manual_seed(seed)
    cls, config = (FluxTransformer2DModel, FLUX) if family == "flux" else (SD3Transformer2DModel, SD3)
    model = cls(**config).eval()
    with torch.no_grad():  # diffusers zero-inits some output layers: random everywhere
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * SCALE)
    return model


def comfy_from_diffusers(model, family: str):
    """A ComfyUI MODEL (ModelPatcher) with the weights of a diffusers Flux / SD3 transformer."""
    import comfy.model_detection
    import comfy.model_patcher
    import comfy.supported_models

    # copies: the conversion writes swapped halves into the tensors it is given
    sd = comfy.model_detection.convert_diffusers_mmdit({k: v.clone() for k, v in model.state_dict().items()}, "")
    config = comfy.model_detection.detect_unet_config(sd, "")
    config.update(COMFY_OVERRIDES[family])
    cls = comfy.supported_models.Flux if family == "flux" else comfy.supported_models.SD3
    model_config = cls(config)
    model_config.set_inference_dtype(torch.float32, None)
    base = model_config.get_model(sd, "")
    base.load_model_weights(sd, "")
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu)


def tiny_comfy_qwen(seed: int = 0):
    """A ComfyUI Qwen-Image MODEL built with ComfyUI's own class at a tiny width, random weights."""
    import comfy.supported_models

    config = {"image_model": "qwen_image", "num_layers": 2, "attention_head_dim": 16, "num_attention_heads": 2,
              "joint_attention_dim": 32, "axes_dims_rope": (4, 6, 6), "in_channels": 64, "out_channels": 16}
    return comfy_random(comfy.supported_models.QwenImage(config), seed)


def comfy_random(model_config, seed: int = 0, scale: float = 0.1):
    """A ComfyUI MODEL (float32, CPU) of a supported_models config, its weights ~ N(0, scale²)."""
    import comfy.model_patcher

    model_config.set_inference_dtype(torch.float32, None)
    base = model_config.get_model({}, "")
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in base.diffusion_model.parameters():
            p.copy_(torch.randn_like(p) * scale)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu)


def run_dit(patcher, x, sigma, context, **conds):
    """One denoiser call as ComfyUI's sampler makes it (``apply_model`` with the patcher's
    wrappers and transformer_options); returns the model output (the velocity for flow models)."""
    import comfy.patcher_extension

    patcher.patch_model()
    try:
        options = dict(patcher.model_options.get("transformer_options", {}))
        options["wrappers"] = comfy.patcher_extension.copy_nested_dicts(patcher.wrappers)
        s = torch.full((x.shape[0],), float(sigma))
        with torch.no_grad():
            denoised = patcher.model.apply_model(x, s, c_crossattn=context, transformer_options=options, **conds)
        return (x - denoised) / float(sigma)
    finally:
        patcher.unpatch_model()


def inputs(family: str, batch: int = 2, hw=(16, 16), n_txt: int = 7, seed: int = 1):
    """(latent (B, 16, H, W), text context (B, n_txt, 32), extra conds) of one call."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, *hw, generator=g)
    ctx = torch.randn(batch, n_txt, 32, generator=g)
    conds = {"y": torch.randn(batch, 16, generator=g)}
    if family == "flux":
        conds["guidance"] = torch.full((batch,), 3.5)
    return x, ctx, conds


def run_diffusers(model, family: str, x, sigma, context, conds):
    """The diffusers transformer on the same call, its output as ComfyUI's (B, 16, H, W)."""
    b, c, h, w = x.shape
    with torch.no_grad():
        if family == "sd3":
            t = torch.full((b,), float(sigma) * 1000)
            return model(x, encoder_hidden_states=context, pooled_projections=conds["y"], timestep=t).sample
        packed = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)
        ids = torch.zeros(h // 2, w // 2, 3)
        ids[..., 1] = torch.arange(h // 2)[:, None]
        ids[..., 2] = torch.arange(w // 2)[None, :]
        out = model(packed, encoder_hidden_states=context, pooled_projections=conds["y"],
                    timestep=torch.full((b,), float(sigma)), img_ids=ids.reshape(-1, 3),
                    txt_ids=torch.zeros(context.shape[1], 3), guidance=conds["guidance"]).sample
        return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


@contextmanager
def recorded_plans():
    """Every plan the runtime hands out while active (``MergeRuntime.plan_for``), in call order."""
    from tomesd_ext.core.runtime import MergeRuntime

    plans, original = [], MergeRuntime.plan_for

    def record(self, metric, scope=None):
        plan = original(self, metric, scope)
        plans.append(plan)
        return plan

    MergeRuntime.plan_for = record
    try:
        yield plans
    finally:
        MergeRuntime.plan_for = original


def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def assert_same_merge(ref, out, dref, dout, comfy_plans, diffusers_plans) -> None:
    """Node/adapter parity between two implementations, robust to the float order of the machine.

    What is exactly comparable is compared exactly: both adapters made the same plans (groups,
    sizes, anchors), block by block. The outputs then agree up to float noise, bounded from the
    noise of the same two models unmerged (ref vs dref: different kernels, fusion and summation
    order): merging in identical groups may amplify that noise (fewer, averaged tokens), never by
    orders of magnitude. The bound stays far below the effect of merging, so a wrong merge fails.
    """
    assert comfy_plans and any(p is not None for p in comfy_plans), "the node merged nothing"
    assert len(comfy_plans) == len(diffusers_plans), (len(comfy_plans), len(diffusers_plans))
    for i, (a, b) in enumerate(zip(comfy_plans, diffusers_plans)):
        assert (a is None) == (b is None), f"block call {i}: one adapter merged, the other did not"
        if a is not None:
            for name in ("group", "size", "anchor"):
                x, y = getattr(a, name), getattr(b, name)
                assert (x is None) == (y is None) and (x is None or torch.equal(x, y)), f"block call {i}: {name} differs"
    noise = _rel(ref, dref)
    assert noise < 1e-4, noise  # the same model in both
    tol = max(1e-3, 100 * noise)
    effect = _rel(dout, dref)
    assert effect > 5 * tol, (effect, tol)  # the tolerance can tell a wrong merge
    assert _rel(out, dout) < tol, (_rel(out, dout), tol)

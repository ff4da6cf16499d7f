"""Tiny random-weight video transformers built with ComfyUI's own classes (Wan 2.1 / 2.2,
HunyuanVideo, LTX-Video) for the ComfyUI video DiT tests, and the same Wan and LTX-Video weights in
diffusers' ``WanTransformer3DModel`` / ``LTXVideoTransformer3DModel`` through diffusers' own key
conversions (ComfyUI v0.8.0 has no diffusers -> ComfyUI conversion for these; its keys are the
original checkpoints', which ``convert_wan_transformer_to_diffusers`` and
``convert_ltx_transformer_checkpoint_to_diffusers`` read)."""

from __future__ import annotations

import torch

# dim 64 = 2 heads of 32 (rotary axes 12/10/10 in both libraries)
WAN = {"image_model": "wan2.1", "model_type": "t2v", "dim": 64, "ffn_dim": 128, "num_heads": 2, "num_layers": 2,
       "in_dim": 16, "out_dim": 16, "text_dim": 32, "freq_dim": 256, "patch_size": (1, 2, 2), "window_size": (-1, -1),
       "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6}
HUNYUAN = {"image_model": "hunyuan_video", "in_channels": 16, "out_channels": 16, "patch_size": [1, 2, 2],
           "vec_in_dim": 16, "axes_dim": [4, 6, 6], "meanflow": False, "context_in_dim": 32, "hidden_size": 64,
           "mlp_ratio": 2.0, "num_heads": 4, "depth": 2, "depth_single_blocks": 2, "theta": 256, "qkv_bias": True,
           "guidance_embed": False, "byt5": False, "use_cond_type_embedding": False, "vision_in_dim": None,
           "meanflow_sum": False}
LTXV = {"image_model": "ltxv", "in_channels": 128, "cross_attention_dim": 64, "attention_head_dim": 16,
        "num_attention_heads": 4, "caption_channels": 32, "num_layers": 2}
# Wan 2.2 TI2V's layout: 48 latent channels, one timestep per latent frame (from the denoise mask)
WAN22 = dict(WAN, in_dim=48, out_dim=48)
CONFIGS = {"wan": ("WAN21_T2V", WAN), "wan22": ("WAN22_T2V", WAN22), "hunyuan": ("HunyuanVideo", HUNYUAN),
           "ltxv": ("LTXV", LTXV)}
CHANNELS = {"wan": 16, "wan22": 48, "hunyuan": 16, "ltxv": 128}
SCALE = 0.1


def tiny_comfy_video(family: str, seed: int = 0):
    """A ComfyUI MODEL (ModelPatcher) of ComfyUI's own class at a tiny width, seeded random weights."""
    import comfy.model_patcher
    import comfy.supported_models

    name, config = CONFIGS[family]
    model_config = getattr(comfy.supported_models, name)(dict(config))
    model_config.set_inference_dtype(torch.float32, None)
    base = model_config.get_model({}, "")
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in base.diffusion_model.parameters():
            p.copy_(torch.randn_like(p) * SCALE)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu)


def diffusers_wan_from_comfy(patcher):
    """diffusers' WanTransformer3DModel holding the weights of a tiny ComfyUI Wan MODEL."""
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    c, dm = WAN, patcher.model.diffusion_model
    model = WanTransformer3DModel(
        patch_size=c["patch_size"], num_attention_heads=c["num_heads"], attention_head_dim=c["dim"] // c["num_heads"],
        in_channels=dm.patch_embedding.in_channels, out_channels=dm.out_dim, text_dim=c["text_dim"], freq_dim=c["freq_dim"],
        ffn_dim=c["ffn_dim"], num_layers=c["num_layers"], cross_attn_norm=True, eps=c["eps"],
    ).eval()
    # copies: the conversion pops and reshapes entries of the dict it is given
    sd = {k: v.clone() for k, v in patcher.model.diffusion_model.state_dict().items()}
    missing, unexpected = model.load_state_dict(convert_wan_transformer_to_diffusers(sd), strict=True)
    assert not missing and not unexpected
    return model


def video_inputs(family: str, batch: int = 2, thw=(3, 8, 8), n_txt: int = 7, seed: int = 1):
    """(latent (B, C, T, H, W), text context (B, n_txt, 32), extra conds) of one call."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, CHANNELS[family], *thw, generator=g)
    ctx = torch.randn(batch, n_txt, 32, generator=g)
    conds = {}
    if family == "hunyuan":
        conds["y"] = torch.randn(batch, 16, generator=g)
    if family == "ltxv":
        conds.update(frame_rate=25, attention_mask=None)
    return x, ctx, conds


def run_diffusers_wan(model, x, sigma, context, frame_scale=None):
    """diffusers' Wan on the same call: its velocity (B, C, T, H, W). frame_scale: (B, T), Wan
    2.2's per-frame timestep factors (ComfyUI's denoise mask), given per token as diffusers takes it."""
    with torch.no_grad():
        t = torch.full((x.shape[0],), float(sigma) * 1000)
        if frame_scale is not None:
            hw = (x.shape[3] // 2) * (x.shape[4] // 2)
            t = (t[:, None] * frame_scale).repeat_interleave(hw, dim=1)
        return model(x, timestep=t, encoder_hidden_states=context).sample


def diffusers_ltx_from_comfy(patcher):
    """diffusers' LTXVideoTransformer3DModel holding the weights of a tiny ComfyUI LTX-Video MODEL."""
    from diffusers import LTXVideoTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_ltx_transformer_checkpoint_to_diffusers

    c = LTXV
    model = LTXVideoTransformer3DModel(
        in_channels=c["in_channels"], out_channels=c["in_channels"], patch_size=1, patch_size_t=1,
        num_attention_heads=c["num_attention_heads"], attention_head_dim=c["attention_head_dim"],
        cross_attention_dim=c["cross_attention_dim"], num_layers=c["num_layers"], caption_channels=c["caption_channels"],
    ).eval()
    sd = {k: v.clone() for k, v in patcher.model.diffusion_model.state_dict().items()}  # copies, as above
    missing, unexpected = model.load_state_dict(convert_ltx_transformer_checkpoint_to_diffusers(sd), strict=True)
    assert not missing and not unexpected
    return model


def run_diffusers_ltx(model, x, sigma, context, frame_rate=25):
    """diffusers' LTX-Video on the same call (packed tokens, the positions ComfyUI uses: VAE scale
    8 x 32 x 32, frame rate 25): its velocity (B, C, T, H, W)."""
    b, c, f, h, w = x.shape
    with torch.no_grad():
        out = model(x.permute(0, 2, 3, 4, 1).reshape(b, f * h * w, c), encoder_hidden_states=context,
                    timestep=torch.full((b,), float(sigma) * 1000), encoder_attention_mask=torch.ones(b, context.shape[1]),
                    num_frames=f, height=h, width=w, rope_interpolation_scale=(8 / frame_rate, 32, 32)).sample
    return out.reshape(b, f, h, w, c).permute(0, 4, 1, 2, 3)

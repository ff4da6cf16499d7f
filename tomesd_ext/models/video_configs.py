"""Architecture configs (plain data) of the video diffusion transformers and their reduced/tiny twins.

Entries have the fields of ``dit_configs.DIT_CONFIGS`` (which includes them) plus ``video``: the
VAE geometry the bench maps pixels through, ``spatial`` / ``temporal`` compression (a causal video
VAE: F pixel frames -> (F - 1) / temporal + 1 latent frames), latent ``channels``, and the
``height``, ``width``, ``frames`` of the bench's default clip. Token grid of a clip:
(latent frames / patch_t, H / spatial / patch, W / spatial / patch).

Sources (``transformer/config.json`` of the diffusers repositories, as facts):
- Wan-AI/Wan2.1-T2V-1.3B-Diffusers: 30 blocks of 1536 (12 x 128), ffn 8960, umT5 text 4096 padded
  to 512 tokens, Wan VAE 8x spatial / 4x temporal, 16 channels; CFG (guidance 5.0).
- Lightricks/LTX-Video (0.9.x, 2B): 28 blocks of 2048 (32 x 64), T5 4096 padded to 128 tokens,
  its VAE 32x spatial / 8x temporal, 128 channels, patch 1; CFG (guidance 3.0); the pipeline's
  default clip 512 x 704, 161 frames (21 x 16 x 22 = 7,392 tokens).
- hunyuanvideo-community/HunyuanVideo (13B): 20 double + 40 single blocks of 3072 (24 x 128),
  2 token-refiner blocks, LLaVA-Llama-3 text 4096 (256 tokens), CLIP-L pooled 768, guidance-
  distilled (embedded guidance 6.0, batch 1); VAE 8x / 4x, 16 channels.
"""

WAN21_T2V_1_3B = {  # Wan-AI/Wan2.1-T2V-1.3B-Diffusers
    "patch_size": [1, 2, 2],
    "num_attention_heads": 12,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,  # umT5-XXL
    "freq_dim": 256,
    "ffn_dim": 8960,
    "num_layers": 30,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-06,
    "image_dim": None,
    "added_kv_proj_dim": None,
    "rope_max_seq_len": 1024,
}

LTX_VIDEO = {  # Lightricks/LTX-Video (0.9.x, 2B)
    "in_channels": 128,
    "out_channels": 128,
    "patch_size": 1,
    "patch_size_t": 1,
    "num_attention_heads": 32,
    "attention_head_dim": 64,
    "cross_attention_dim": 2048,
    "num_layers": 28,
    "activation_fn": "gelu-approximate",
    "qk_norm": "rms_norm_across_heads",
    "norm_elementwise_affine": False,
    "norm_eps": 1e-06,
    "caption_channels": 4096,  # T5-XXL
    "attention_bias": True,
    "attention_out_bias": True,
}

HUNYUAN_VIDEO = {  # hunyuanvideo-community/HunyuanVideo
    "in_channels": 16,
    "out_channels": 16,
    "num_attention_heads": 24,
    "attention_head_dim": 128,
    "num_layers": 20,
    "num_single_layers": 40,
    "num_refiner_layers": 2,
    "mlp_ratio": 4.0,
    "patch_size": 2,
    "patch_size_t": 1,
    "qk_norm": "rms_norm",
    "guidance_embeds": True,
    "text_embed_dim": 4096,  # LLaVA-Llama-3-8B hidden states
    "pooled_projection_dim": 768,  # CLIP-L pooled
    "rope_theta": 256.0,
    "rope_axes_dim": [16, 56, 56],
    "image_condition_type": None,
}

_WAN = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
_LTX = "Lightricks/LTX-Video"
_HUNYUAN = "hunyuanvideo-community/HunyuanVideo"
_TINY = "tiny (structure of {}, toy widths)"

WAN_VAE = {"spatial": 8, "temporal": 4, "channels": 16, "height": 480, "width": 832, "frames": 17}
LTX_VAE = {"spatial": 32, "temporal": 8, "channels": 128, "height": 512, "width": 704, "frames": 161}
HUNYUAN_VAE = {"spatial": 8, "temporal": 4, "channels": 16, "height": 480, "width": 832, "frames": 17}
# tiny twins: 256 x 512 px, 17 frames -> about 2,000-2,600 tokens, above apply_tome's auto-skip (2048)
_TINY_CLIP = {"height": 256, "width": 512, "frames": 17}


def _video(family, source, transformer, cfg, text_tokens, vae, use_instead=None):
    return {"family": family, "source": source, "transformer": transformer, "scheduler": "flow", "cfg": cfg,
            "text_tokens": text_tokens, "use_instead": use_instead, "video": dict(vae)}


VIDEO_CONFIGS = {
    "wan-1.3b": _video("wan", _WAN, WAN21_T2V_1_3B, True, 512, WAN_VAE),
    "ltx": _video("ltx-video", _LTX, LTX_VIDEO, True, 128, LTX_VAE),
    "hunyuan-video": _video("hunyuan-video", _HUNYUAN, HUNYUAN_VIDEO, False, 256, HUNYUAN_VAE,
                            use_instead="hunyuan-video-depth4"),
    "hunyuan-video-depth4": _video("hunyuan-video", _HUNYUAN, {**HUNYUAN_VIDEO, "num_layers": 2, "num_single_layers": 2},
                                   False, 256, HUNYUAN_VAE),
    "tiny-wan": _video("wan", _TINY.format(_WAN), {
        **WAN21_T2V_1_3B, "num_attention_heads": 2, "attention_head_dim": 12, "text_dim": 16, "freq_dim": 32,
        "ffn_dim": 48, "num_layers": 2}, True, 16, {**WAN_VAE, **_TINY_CLIP}),
    "tiny-ltx": _video("ltx-video", _TINY.format(_LTX), {
        **LTX_VIDEO, "num_attention_heads": 2, "attention_head_dim": 12, "cross_attention_dim": 24, "num_layers": 2,
        "caption_channels": 16}, True, 16, {**LTX_VAE, "height": 512, "width": 1024, "frames": 33}),
    "tiny-hunyuan-video": _video("hunyuan-video", _TINY.format(_HUNYUAN), {
        **HUNYUAN_VIDEO, "num_attention_heads": 2, "attention_head_dim": 12, "num_layers": 1, "num_single_layers": 1,
        "num_refiner_layers": 1, "text_embed_dim": 16, "pooled_projection_dim": 8, "rope_axes_dim": [4, 4, 4]},
        False, 16, {**HUNYUAN_VAE, **_TINY_CLIP}),
}

VIDEO_NAMES = tuple(VIDEO_CONFIGS)

"""Tiny random-weight diffusers transformers of the six image-DiT families with their call inputs.

``make(family, batch, h, w)`` -> (model, kwargs, sample_of_output): h x w is the image token grid;
``layers``: Qwen-Image's block count (the other families keep their fixed tiny depths).
"""

import torch


def _flux_ids(h, w, axes):
    ids = torch.zeros(h, w, axes)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None]
    return ids.reshape(-1, axes)


def make(family, batch=2, h=12, w=10, seed=0, txt=7, layers=2):
    from diffusers import (
        Flux2Transformer2DModel, FluxTransformer2DModel, PixArtTransformer2DModel, QwenImageTransformer2DModel,
        SD3Transformer2DModel, ZImageTransformer2DModel,
    )

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)

    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    t = torch.full((batch,), 0.5)
    sample = lambda o: o.sample  # noqa: E731
    if family == "flux":
        m = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                                   num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=16,
                                   axes_dims_rope=(4, 6, 6), guidance_embeds=True)
        kw = dict(hidden_states=rnd(batch, h * w, 16), encoder_hidden_states=rnd(batch, txt, 24), pooled_projections=rnd(batch, 16),
                  timestep=t, img_ids=_flux_ids(h, w, 3), txt_ids=torch.zeros(txt, 3), guidance=torch.full((batch,), 3.5))
    elif family == "flux2":
        m = Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
                                    num_attention_heads=2, joint_attention_dim=24, timestep_guidance_channels=32,
                                    axes_dims_rope=(4, 4, 4, 4))
        kw = dict(hidden_states=rnd(batch, h * w, 16), encoder_hidden_states=rnd(batch, txt, 24), timestep=t,
                  img_ids=_flux_ids(h, w, 4), txt_ids=torch.zeros(txt, 4), guidance=torch.full((batch,), 3.5))
    elif family == "sd3":
        m = SD3Transformer2DModel(sample_size=32, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                  num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32,
                                  pooled_projection_dim=16, out_channels=4, pos_embed_max_size=48,
                                  dual_attention_layers=(0,), qk_norm="rms_norm")
        kw = dict(hidden_states=rnd(batch, 4, 2 * h, 2 * w), encoder_hidden_states=rnd(batch, txt, 32),
                  pooled_projections=rnd(batch, 16), timestep=t * 1000)
    elif family == "pixart":
        m = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
                                     sample_size=32, patch_size=2, cross_attention_dim=16, caption_channels=24,
                                     norm_type="ada_norm_single", use_additional_conditions=False)
        kw = dict(hidden_states=rnd(batch, 4, 2 * h, 2 * w), encoder_hidden_states=rnd(batch, txt, 24), timestep=t * 1000,
                  added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    elif family == "qwen-image":
        m = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=layers, attention_head_dim=16,
                                        num_attention_heads=2, joint_attention_dim=24, axes_dims_rope=(4, 6, 6))
        kw = dict(hidden_states=rnd(batch, h * w, 16), encoder_hidden_states=rnd(batch, txt, 24),
                  encoder_hidden_states_mask=torch.ones(batch, txt, dtype=torch.long), timestep=t, img_shapes=[[(1, h, w)]] * batch)
    elif family == "z-image":
        m = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=64, n_layers=2,
                                     n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=24, axes_dims=[8, 12, 12],
                                     axes_lens=[64, 64, 64])
        kw = dict(x=[rnd(4, 1, 2 * h, 2 * w) for _ in range(batch)], t=t, cap_feats=[rnd(txt, 24) for _ in range(batch)])
        sample = lambda o: torch.stack(list(o.sample))  # noqa: E731
    else:
        raise ValueError(family)
    return m.eval(), kw, sample


FAMILIES = ("flux", "flux2", "sd3", "pixart", "qwen-image", "z-image")


def cfg_batch(kw):
    """The same call as a CFG batch: every tensor input repeated as halves (same latent twice)."""
    out = {}
    for k, v in kw.items():
        if isinstance(v, torch.Tensor) and k not in ("img_ids", "txt_ids"):
            out[k] = torch.cat([v, v])
        elif isinstance(v, list):
            out[k] = v + v
        else:
            out[k] = v
    return out


VIDEO_FAMILIES = ("wan", "hunyuan-video", "ltx-video")


def make_video(family, batch=1, frames=3, h=6, w=5, seed=0, txt=7, layers=2):
    """A tiny video transformer and its call on a frames x h x w token grid (``layers`` blocks; HunyuanVideo:
    double and single blocks each)."""
    from diffusers import HunyuanVideoTransformer3DModel, LTXVideoTransformer3DModel, WanTransformer3DModel

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)

    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    t = torch.full((batch,), 500.0)
    if family == "wan":
        m = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
                                  out_channels=4, text_dim=16, freq_dim=32, ffn_dim=48, num_layers=layers, rope_max_seq_len=64)
        kw = dict(hidden_states=rnd(batch, 4, frames, 2 * h, 2 * w), timestep=t, encoder_hidden_states=rnd(batch, txt, 16))
    elif family == "hunyuan-video":
        m = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12,
                                           num_layers=layers // 2, num_single_layers=layers // 2, num_refiner_layers=1, patch_size=2,
                                           patch_size_t=1, text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(4, 4, 4))
        kw = dict(hidden_states=rnd(batch, 4, frames, 2 * h, 2 * w), timestep=t, encoder_hidden_states=rnd(batch, txt, 16),
                  encoder_attention_mask=torch.ones(batch, txt), pooled_projections=rnd(batch, 8), guidance=torch.full((batch,), 6000.0))
    elif family == "ltx-video":
        m = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2,
                                       attention_head_dim=12, cross_attention_dim=24, num_layers=layers, caption_channels=16)
        kw = dict(hidden_states=rnd(batch, frames * h * w, 8), encoder_hidden_states=rnd(batch, txt, 16), timestep=t.long(),
                  encoder_attention_mask=torch.ones(batch, txt), num_frames=frames, height=h, width=w)
    else:
        raise ValueError(family)
    return m.eval(), kw, (lambda o: o.sample)

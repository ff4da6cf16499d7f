"""The single-file (LDM) key layout written by tomesd_ext.models.checkpoint, checked on the
meta device (no weights): names are unique, counts match the original SD1.5 release and known
anchors land where ComfyUI's / the original loader expects them."""

import pytest
import torch

from tomesd_ext.models import get_config
from tomesd_ext.models.checkpoint import unet_state_dict, vae_state_dict


def _meta(cls, config):
    with torch.device("meta"):
        return cls(**config)


@pytest.fixture(scope="module")
def sd15_unet_keys():
    from diffusers import UNet2DConditionModel

    unet = _meta(UNet2DConditionModel, get_config("sd15")["unet"])
    sd = unet_state_dict(unet)
    assert len(sd) == len(unet.state_dict())  # no two diffusers keys mapped to one name
    return {k: tuple(v.shape) for k, v in sd.items()}


def test_sd15_unet_layout(sd15_unet_keys):
    keys = sd15_unet_keys
    assert len(keys) == 686  # tensors of model.diffusion_model.* in the original v1-5 checkpoint
    p = "model.diffusion_model."
    expect = {
        "input_blocks.0.0.weight": (320, 4, 3, 3),
        "input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (320, 320),
        "input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
        "input_blocks.4.0.in_layers.0.weight": (320,),
        "input_blocks.4.0.emb_layers.1.weight": (640, 1280),
        "input_blocks.4.0.out_layers.3.weight": (640, 640, 3, 3),
        "input_blocks.11.0.in_layers.2.weight": (1280, 1280, 3, 3),
        "middle_block.1.transformer_blocks.0.attn2.to_k.weight": (1280, 768),
        "middle_block.2.out_layers.3.weight": (1280, 1280, 3, 3),
        "output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        "output_blocks.8.2.conv.weight": (640, 640, 3, 3),
        "output_blocks.11.1.proj_out.weight": (320, 320, 1, 1),
        "time_embed.0.weight": (1280, 320),
        "time_embed.2.weight": (1280, 1280),
        "out.0.weight": (320,),
        "out.2.weight": (4, 320, 3, 3),
    }
    for name, shape in expect.items():
        assert keys[p + name] == shape, name
    assert not any("input_blocks.10.1" in k or "output_blocks.0.1" in k for k in keys)  # no attention at d=8


def test_sd15_vae_layout():
    from diffusers import AutoencoderKL

    vae = _meta(AutoencoderKL, get_config("sd15")["vae"])
    sd = vae_state_dict(vae)
    assert len(sd) == len(vae.state_dict()) == 248
    p = "first_stage_model."
    assert sd[p + "encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert sd[p + "decoder.mid.attn_1.proj_out.weight"].shape == (512, 512, 1, 1)
    assert sd[p + "decoder.up.3.block.0.conv1.weight"].shape == (512, 512, 3, 3)  # diffusers up_blocks.0
    assert sd[p + "decoder.up.0.block.0.nin_shortcut.weight"].shape == (128, 256, 1, 1)
    assert sd[p + "encoder.down.0.downsample.conv.weight"].shape == (128, 128, 3, 3)
    assert sd[p + "encoder.norm_out.weight"].shape == (512,)
    assert p + "quant_conv.weight" in sd and p + "post_quant_conv.weight" in sd

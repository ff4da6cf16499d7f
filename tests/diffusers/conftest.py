import pytest
import torch

from tomesd_ext.models import build_unet


def unet_inputs(unet, batch=2, hw=None, seed=0):
    """Random (sample, timestep, encoder_hidden_states, added_cond_kwargs) for a UNet."""
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    h, w = hw or (cfg.sample_size, cfg.sample_size)
    sample = torch.randn(batch, cfg.in_channels, h, w, generator=g)
    text = torch.randn(batch, 7, cfg.cross_attention_dim, generator=g)
    kwargs = {}
    if cfg.addition_embed_type == "text_time":
        proj = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, proj, generator=g),
            "time_ids": torch.randn(batch, 6, generator=g),
        }
    return sample, torch.tensor(500), text, kwargs


@pytest.fixture(autouse=True)
def merge_small_grids(monkeypatch):
    """These tests check the adapter's mechanics on tiny grids (a few hundred tokens), below the
    auto-skip threshold (ToMeOptions.min_tokens, docs/benchmarks.md): merge every grid here."""
    monkeypatch.setattr("tomesd_ext.core.options.MIN_TOKENS_DEFAULT", 0)


def run(unet, inputs):
    sample, t, text, kwargs = inputs
    with torch.no_grad():
        return unet(sample, t, encoder_hidden_states=text, **kwargs).sample


@pytest.fixture(scope="module")
def tiny_unet():
    return build_unet("tiny", seed=0).eval()


@pytest.fixture(scope="module")
def tiny_sdxl_unet():
    return build_unet("tiny-sdxl", seed=0).eval()

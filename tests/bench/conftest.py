import pytest
import torch


@pytest.fixture(scope="session")
def tiny_unet():
    from tomesd_ext.models import build_unet

    return build_unet("tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_inputs(tiny_unet):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=gen)
    c = torch.randn(2, 77, tiny_unet.config.cross_attention_dim, generator=gen)
    return x, torch.tensor(500), c

import numpy as np
import pytest
import torch

from tomesd_ext.bench import metrics
from tomesd_ext.bench.latent_map import latent_to_rgb, rgb_to_latent


def test_rel_error_known_values():
    ref = torch.ones(2, 4, 8, 8)
    assert metrics.rel_error(ref * 1.1, ref) == pytest.approx(0.1)
    assert metrics.rel_error(ref, ref) == 0.0
    assert metrics.rel_error(torch.zeros(3), torch.zeros(3)) == 0.0


def test_psnr_known_value_and_identity():
    ref = np.full((16, 16, 3), 0.5)
    assert metrics.psnr(ref + 0.1, ref) == pytest.approx(20.0)  # mse 0.01, range 1
    assert metrics.psnr(ref, ref) is None  # identical: infinite PSNR, stored as null


def test_ssim_identity_and_degradation():
    rng = np.random.default_rng(0)
    ref = rng.random((32, 32, 3))
    assert metrics.ssim(ref, ref) == pytest.approx(1.0)
    noisy = np.clip(ref + rng.normal(0, 0.2, ref.shape), 0, 1)
    assert metrics.ssim(noisy, ref) < 0.9
    assert metrics.ssim(ref[:5, :5], ref[:5, :5]) == pytest.approx(1.0)  # small images: smaller window


def test_to_image_clamps_and_transposes():
    rgb = torch.tensor([-2.0, 0.0, 2.0]).view(3, 1, 1).expand(3, 2, 4)
    img = metrics.to_image(rgb)
    assert img.shape == (2, 4, 3)
    assert img[0, 0].tolist() == [0.0, 0.5, 1.0]


def test_rgb_latent_round_trip_is_exact_on_patch_constant_images():
    gen = torch.Generator().manual_seed(0)
    small = torch.rand(2, 3, 4, 5, generator=gen) * 2 - 1
    image = small.repeat_interleave(8, 2).repeat_interleave(8, 3)  # constant 8x8 patches
    latent = rgb_to_latent(image)
    assert latent.shape == (2, 4, 4, 5)
    torch.testing.assert_close(latent_to_rgb(latent), small, atol=1e-5, rtol=0)


def test_rgb_to_latent_keeps_structure_and_checks_size():
    image = torch.zeros(1, 3, 16, 16)
    image[..., :8, :] = 1.0
    latent = rgb_to_latent(image)
    assert not torch.allclose(latent[..., 0, :], latent[..., 1, :])
    with pytest.raises(ValueError, match="multiple of 8"):
        rgb_to_latent(torch.zeros(1, 3, 12, 16))

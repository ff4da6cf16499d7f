"""End-to-end: the standard diffusers pipelines run patched, and unpatch exactly."""

import numpy as np
import pytest
import torch

from tomesd_ext import apply_tome, remove_tome
from tomesd_ext.models import build_pipeline, random_lora


def _generate(pipe, **kwargs):
    args = dict(prompt="a photo of a cat", num_inference_steps=2, guidance_scale=7.5, output_type="latent")
    args.update(kwargs)
    return pipe(generator=torch.Generator().manual_seed(0), **args).images


def _check(pipe, **kwargs):
    base = _generate(pipe, **kwargs)
    returned = apply_tome(pipe, 0.5, seed=0)
    assert returned is pipe
    merged = _generate(pipe, **kwargs)
    again = _generate(pipe, **kwargs)
    remove_tome(pipe)
    restored = _generate(pipe, **kwargs)
    assert torch.isfinite(merged).all()
    assert torch.equal(merged, again), "same seed must give the same result on every call"
    assert not torch.equal(merged, base), "nothing was merged"
    assert torch.equal(restored, base), "remove_tome must restore the pipeline exactly"


@pytest.mark.parametrize("name", ["tiny", "tiny-sd2"])
def test_txt2img(name):
    pipe = build_pipeline(name, "txt2img", seed=0)
    if name == "tiny-sd2":
        assert pipe.scheduler.config.prediction_type == "v_prediction"
    _check(pipe, height=128, width=128)


def test_img2img_and_inpaint():
    image = torch.rand(1, 3, 128, 128)
    _check(build_pipeline("tiny", "img2img", seed=0), image=image, strength=0.8, num_inference_steps=3)
    mask = torch.zeros(1, 1, 128, 128)
    mask[..., 32:96, 32:96] = 1
    _check(build_pipeline("tiny", "inpaint", seed=0), image=image, mask_image=mask, height=128, width=128)


def test_controlnet_with_lora():
    pipe = build_pipeline("tiny", "controlnet", seed=0)
    random_lora(pipe.unet, seed=0)
    control = torch.rand(1, 3, 128, 128)
    _check(pipe, image=control, height=128, width=128)
    # the ControlNet model itself can be merged too
    base = _generate(pipe, image=control, height=128, width=128)
    apply_tome(pipe.controlnet, 0.5, seed=0)
    out = _generate(pipe, image=control, height=128, width=128)
    remove_tome(pipe.controlnet)
    assert not torch.equal(out, base)
    assert torch.equal(_generate(pipe, image=control, height=128, width=128), base)


def test_sdxl_pipeline_merges_by_default():
    pipe = build_pipeline("tiny-sdxl", "txt2img", seed=0)
    _check(pipe, height=128, width=128)


def test_decoded_images_stay_valid():
    pipe = build_pipeline("tiny", "txt2img", seed=0)
    apply_tome(pipe, 0.5, seed=0)
    images = _generate(pipe, height=136, width=104, output_type="np")
    assert images.shape == (1, 136, 104, 3) and np.isfinite(images).all()

"""The ToMe node on ComfyUI's Flux.2 (``comfy.ldm.flux.model.Flux`` with global modulation, patch
size 1, 4-axis rotary table), built tiny with random weights: exact at ratio 0, merged otherwise
in both modes, the input MODEL unchanged, odd/non-square latents and batches."""

import pytest
import torch

from comfy_env import import_comfy, tome_node
from dit_models import comfy_random, run_dit

pytestmark = pytest.mark.comfyui

SIGMA = 0.7
# the detected Flux.2 config (model_detection) at a tiny width: 2 heads of 32 = 4 rotary axes of 8
FLUX2 = {"image_model": "flux2", "in_channels": 8, "out_channels": 8, "vec_in_dim": None, "context_in_dim": 32,
         "hidden_size": 64, "mlp_ratio": 3.0, "num_heads": 2, "depth": 2, "depth_single_blocks": 2,
         "axes_dim": [8, 8, 8, 8], "theta": 2000, "patch_size": 1, "qkv_bias": False, "guidance_embed": True,
         "txt_ids_dims": [3], "global_modulation": True, "mlp_silu_act": True, "ops_bias": False,
         "default_ref_method": "index", "ref_index_scale": 10.0}


@pytest.fixture(scope="module")
def flux2():
    import_comfy()
    import comfy.supported_models

    return comfy_random(comfy.supported_models.Flux2(dict(FLUX2)))


def call_inputs(batch=2, hw=(12, 12), n_txt=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, FLUX2["in_channels"], *hw, generator=g)
    ctx = torch.randn(batch, n_txt, FLUX2["context_in_dim"], generator=g)
    return x, ctx, {"guidance": torch.full((batch,), 4.0)}


def test_detected_as_flux2(flux2):
    from tomesd_ext.comfy.dit_families import family_of

    dm = flux2.model.diffusion_model
    assert family_of(dm).key(dm) == "flux2"


@pytest.mark.parametrize("mode", ("block", "kv"))
def test_ratio_zero_exact_merged_differs_and_base_untouched(flux2, mode):
    x, ctx, conds = call_inputs()
    ref = run_dit(flux2, x, SIGMA, ctx, **conds)
    assert torch.equal(run_dit(tome_node(flux2, ratio=0.0, dit_mode=mode), x, SIGMA, ctx, **conds), ref)
    merged = run_dit(tome_node(flux2, ratio=0.5, dit_mode=mode), x, SIGMA, ctx, **conds)
    assert torch.isfinite(merged).all() and not torch.allclose(merged, ref, atol=1e-5)
    assert not flux2.model_options.get("transformer_options", {}).get("patches_replace")
    assert torch.equal(run_dit(flux2, x, SIGMA, ctx, **conds), ref)


@pytest.mark.parametrize("shape", [(1, 13, 22), (3, 16, 10)])
def test_odd_non_square_latents_and_batches(flux2, shape):
    batch, h, w = shape
    x, ctx, conds = call_inputs(batch=batch, hw=(h, w))
    ref = run_dit(flux2, x, SIGMA, ctx, **conds)
    assert torch.equal(run_dit(tome_node(flux2, ratio=0.0), x, SIGMA, ctx, **conds), ref)
    out = run_dit(tome_node(flux2, ratio=0.5, seed=3), x, SIGMA, ctx, **conds)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert not torch.allclose(out, ref, atol=1e-5)

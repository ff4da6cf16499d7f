"""The ToMe node on ComfyUI's PixArt (PixArtMS) and Lumina2 / Z-Image (NextDiT) classes, built
tiny with random weights: the blocks run without patches_replace, so the patch hooks them for
its own calls only. Exact at ratio 0, merged otherwise, no hook left on the shared model (also
after a failing call), odd/non-square latents and batches, Z-Image's pad tokens, kv where it
reaches the attention and a named error where it does not."""

import pytest
import torch

from comfy_env import import_comfy, tome_node
from dit_models import comfy_random, run_dit

pytestmark = pytest.mark.comfyui

SIGMA = 0.7
TINY = {
    "pixart": ("PixArtSigma", 4, {"image_model": "pixart_sigma", "input_size": 16, "patch_size": 2, "in_channels": 4,
                                  "hidden_size": 64, "depth": 3, "num_heads": 2, "caption_channels": 32,
                                  "model_max_length": 16, "micro_condition": False}),
    "lumina2": ("Lumina2", 16, {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 64, "n_layers": 3,
                                "n_refiner_layers": 1, "n_heads": 2, "n_kv_heads": 2, "multiple_of": 16,
                                "cap_feat_dim": 32, "axes_dims": [8, 12, 12], "axes_lens": [64, 64, 64], "qk_norm": True}),
    # Z-Image: the same class with pad tokens after the image (and after the caption); its
    # modulation takes a 256-wide time embedding, so the width is 256 (2 heads of 128)
    "z-image": ("Lumina2", 16, {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 256, "n_layers": 3,
                                "n_refiner_layers": 1, "n_heads": 2, "n_kv_heads": 2, "multiple_of": 16,
                                "cap_feat_dim": 32, "axes_dims": [32, 48, 48], "axes_lens": [64, 64, 64], "qk_norm": True,
                                "z_image_modulation": True, "pad_tokens_multiple": 32, "time_scale": 1000.0}),
}
FAMILIES = tuple(TINY)
KV = ("lumina2", "z-image")


def tiny(family, seed=0):
    import comfy.supported_models

    name, _channels, config = TINY[family]
    return comfy_random(getattr(comfy.supported_models, name)(dict(config)), seed)


@pytest.fixture(scope="module")
def models():
    import_comfy()
    return {family: tiny(family) for family in FAMILIES}


def call_inputs(family, batch=2, hw=(16, 16), n_txt=7, seed=1):
    if family == "pixart":  # its sin-cos table needs a latent of at least 32 on average (256 px)
        hw = (hw[0] + 20 + hw[0] % 2, hw[1] + 20 + hw[1] % 2)  # and even sides (ComfyUI's PixArt)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, TINY[family][1], *hw, generator=g)
    ctx = torch.randn(batch, n_txt, 32, generator=g)
    if family == "pixart":  # the image size in pixels, as PixArt.extra_conds passes it
        return x, ctx, {"c_size": torch.tensor([[hw[0] * 8.0, hw[1] * 8.0]]).repeat(batch, 1)}
    return x, ctx, {"num_tokens": n_txt}


def hooks_on(patcher):
    dm = patcher.model.diffusion_model
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in dm.modules())


@pytest.mark.parametrize("family,mode", [(f, "block") for f in FAMILIES] + [(f, "kv") for f in KV])
def test_ratio_zero_exact_merged_differs_and_base_untouched(models, family, mode):
    base = models[family]
    x, ctx, conds = call_inputs(family)
    ref = run_dit(base, x, SIGMA, ctx, **conds)
    assert torch.equal(run_dit(tome_node(base, ratio=0.0, dit_mode=mode), x, SIGMA, ctx, **conds), ref)
    patched = tome_node(base, ratio=0.5, dit_mode=mode)
    assert patched is not base
    merged = run_dit(patched, x, SIGMA, ctx, **conds)
    assert torch.isfinite(merged).all() and not torch.allclose(merged, ref, atol=1e-5)
    assert hooks_on(base) == 0
    assert torch.equal(run_dit(base, x, SIGMA, ctx, **conds), ref)  # the shared model is unchanged


@pytest.mark.parametrize("family", FAMILIES)
def test_blocks_run_on_fewer_image_tokens(models, family):
    """The middle block's attention input: the image span shortened by the ratio, text and pad
    tokens kept."""
    base = models[family]
    dm = base.model.diffusion_model
    block = dm.blocks[1].attn if family == "pixart" else dm.layers[1].attention
    x, ctx, conds = call_inputs(family)
    seen = []
    handle = block.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    try:
        run_dit(base, x, SIGMA, ctx, **conds)
        run_dit(tome_node(base, ratio=0.5), x, SIGMA, ctx, **conds)
    finally:
        handle.remove()
    n_img = (x.shape[-2] // 2) * (x.shape[-1] // 2)
    plain, merged = seen
    assert plain - merged == n_img // 2


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("shape", [(1, 13, 22), (3, 16, 10)])
def test_odd_non_square_latents_and_batches(models, family, shape):
    """Batch 1 and 3; a 13x22 latent (padded to a 7x11 grid) and 16x10 (PixArt, which needs
    larger even latents: 34x42 (a 17x21 grid), 36x30)."""
    base = models[family]
    batch, h, w = shape
    x, ctx, conds = call_inputs(family, batch=batch, hw=(h, w))
    ref = run_dit(base, x, SIGMA, ctx, **conds)
    assert torch.equal(run_dit(tome_node(base, ratio=0.0), x, SIGMA, ctx, **conds), ref)
    out = run_dit(tome_node(base, ratio=0.5, seed=3), x, SIGMA, ctx, **conds)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert not torch.allclose(out, ref, atol=1e-5)


def test_hooks_are_removed_after_a_failing_call(models):
    base = models["lumina2"]
    patched = tome_node(base, ratio=0.5)
    x, ctx, conds = call_inputs("lumina2")
    with pytest.raises(RuntimeError):
        run_dit(patched, x, SIGMA, ctx[..., :31], **conds)  # caption width 31 != 32
    assert hooks_on(base) == 0
    assert torch.isfinite(run_dit(patched, x, SIGMA, ctx, **conds)).all()


def test_pixart_kv_is_refused_by_name(models):
    from tomesd_ext.core import OptionError

    with pytest.raises(OptionError, match="dit_mode='kv'.*PixArt.*'block'"):
        tome_node(models["pixart"], ratio=0.5, dit_mode="kv")


"""Diffusion-transformer models: real configs (on the meta device), tiny builds and forwards,
the sharpened-attention variant, and the size guard of full-depth models."""

import pytest
import torch

from tomesd_ext.models import (
    DIT_NAMES,
    LATENT_CHANNELS,
    build_transformer,
    dit_call,
    get_dit_config,
    meta_transformer,
    parameter_count,
    sharpen_self_attention,
    text_conditioning,
)
from tomesd_ext.models.dit_call import pack2x2, unpack2x2
from tomesd_ext.models.video_configs import VIDEO_NAMES

# image transformers here; video transformers: test_video_models.py
TINY = [n for n in DIT_NAMES if n.startswith("tiny-") and n not in VIDEO_NAMES]

# The documented values (docs/bench.md, "Diffusion transformers"): width, heads x head dim,
# blocks and parameters per block of each kind, total parameters.
REAL = {
    "flux": (3072, 24, 128, {"transformer_blocks": (19, 339831296), "single_transformer_blocks": (38, 141591808)}, 11901408320),
    "flux-depth4": (3072, 24, 128, {"transformer_blocks": (2, 339831296), "single_transformer_blocks": (2, 141591808)}, 1026971200),
    "flux2": (6144, 48, 128, {"transformer_blocks": (8, 981467648), "single_transformer_blocks": (48, 490733824)}, 32223281152),
    "flux2-depth2": (6144, 48, 128, {"transformer_blocks": (1, 981467648), "single_transformer_blocks": (1, 490733824)}, 2288517888),
    "sd35-large": (2432, 38, 64, {"transformer_blocks": (38, 212999680)}, 8056627520),
    "sd35-large-depth2": (2432, 38, 64, {"transformer_blocks": (2, 212999680)}, 388639040),
    "sd35-medium": (1536, 24, 64, {"transformer_blocks": (24, 101506944)}, 2243171520),
    "pixart-sigma": (1152, 16, 72, {"transformer_blocks": (28, 21255552)}, 610856096),
    "qwen-image": (3072, 24, 128, {"transformer_blocks": (60, 339831296)}, 20430401088),
    "qwen-image-depth2": (3072, 24, 128, {"transformer_blocks": (2, 339831296)}, 720185920),
    "z-image": (3840, 30, 128, {"layers": (30, 180910336), "noise_refiner": (2, 180910336), "context_refiner": (2, 176962816)}, 6154908736),
    "z-image-depth2": (3840, 30, 128, {"layers": (2, 180910336), "noise_refiner": (2, 180910336), "context_refiner": (2, 176962816)}, 1089419328),
}


def _first_attention(model):
    return next(m for m in model.modules() if hasattr(m, "processor") and (hasattr(m, "to_q") or hasattr(m, "to_qkv_mlp_proj")))


def test_every_real_name_is_documented_here():
    assert set(REAL) == {n for n in DIT_NAMES if not n.startswith("tiny-") and n not in VIDEO_NAMES}


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_config_numbers(name):
    width, heads, head_dim, blocks, total = REAL[name]
    model = meta_transformer(name)
    attn = _first_attention(model)
    assert attn.heads == heads and attn.to_q.out_features == width == heads * head_dim
    for attr, (count, per_block) in blocks.items():
        assert len(getattr(model, attr)) == count
        assert parameter_count(getattr(model, attr)[0]) == per_block
    assert parameter_count(model) == total


def test_reduced_variants_keep_the_real_block():
    for name, entry in ((n, get_dit_config(n)) for n in REAL):
        if entry["use_instead"]:
            full, reduced = meta_transformer(name), meta_transformer(entry["use_instead"])
            for attr in ("transformer_blocks", "single_transformer_blocks", "layers"):
                if hasattr(full, attr) and len(getattr(reduced, attr)):
                    a, b = getattr(full, attr)[0], getattr(reduced, attr)[0]
                    assert [p.shape for p in a.parameters()] == [p.shape for p in b.parameters()]


def test_full_depth_model_too_large_names_the_reduced_variant():
    with pytest.raises(ValueError, match="use 'flux-depth4'"):
        build_transformer("flux")
    with pytest.raises(KeyError, match="unknown diffusion transformer 'flux3'"):
        build_transformer("flux3")


@pytest.fixture(scope="module")
def tiny_models():
    return {name: build_transformer(name, seed=0) for name in TINY}


def _forward(model, name, h, w, batch=2, seed=0):
    entry = get_dit_config(name)
    family = entry["family"]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, LATENT_CHANNELS[family], h, w, generator=gen)
    cond = text_conditioning(family, entry["transformer"], batch, entry["text_tokens"], seed, halves=2 if batch % 2 == 0 else 1)
    with torch.no_grad():
        return dit_call(model, family, x, 500, cond["text"], cond["pooled"])


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("h,w,batch", [(10, 14, 2), (6, 18, 1), (16, 16, 3)])
def test_tiny_forward_odd_and_non_square_grids(tiny_models, name, h, w, batch):
    out = _forward(tiny_models[name], name, h, w, batch)
    assert out.shape == (batch, LATENT_CHANNELS[get_dit_config(name)["family"]], h, w)
    assert torch.isfinite(out).all() and out.std() > 0.1


def test_tiny_builds_are_seeded(tiny_models):
    again = build_transformer("tiny-flux", seed=0)
    other = build_transformer("tiny-flux", seed=1)
    ref = tiny_models["tiny-flux"].state_dict()
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in ref.items())
    assert not torch.equal(ref["x_embedder.weight"], other.state_dict()["x_embedder.weight"])


def test_odd_latent_side_is_refused(tiny_models):
    with pytest.raises(ValueError, match="must be even"):
        _forward(tiny_models["tiny-sd3"], "tiny-sd3", 9, 10)


def test_pack_roundtrip():
    x = torch.randn(2, 16, 6, 10)
    tokens = pack2x2(x)
    assert tokens.shape == (2, 15, 64)
    assert torch.equal(unpack2x2(tokens, 6, 10), x)
    assert torch.equal(tokens[0, 1, :4], x[0, 0, 0:2, 2:4].reshape(-1))  # token (0, 1): pixels rows 0-1, cols 2-3


@pytest.mark.parametrize("name", TINY)
def test_sharpen_ties_image_attention_only(name):
    model = build_transformer(name, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sharpen_self_attention(model)
    after = model.state_dict()
    tied = 0
    for mod_name, mod in model.named_modules():
        if hasattr(mod, "to_qkv_mlp_proj"):  # Flux.2 single block: key rows := query rows
            w, i = mod.to_qkv_mlp_proj.weight, mod.inner_dim
            assert torch.equal(w[i : 2 * i], w[:i]) and torch.equal(w[:i], before[f"{mod_name}.to_qkv_mlp_proj.weight"][:i])
            tied += 1
        elif hasattr(mod, "processor") and hasattr(mod, "to_q"):
            key = f"{mod_name}.to_q.weight"
            if getattr(mod, "is_cross_attention", False) or mod_name.startswith("context_refiner"):
                assert torch.equal(after[key], before[key]) and not torch.equal(mod.to_k.weight, mod.to_q.weight)
                continue
            assert torch.equal(mod.to_k.weight, mod.to_q.weight)
            scale = 1.0 if getattr(mod, "norm_q", None) is not None else 2.0  # qk norm: tie only
            assert torch.allclose(after[key], scale * before[key])
            if getattr(mod, "add_q_proj", None) is not None:  # text stream untouched
                assert torch.equal(after[f"{mod_name}.add_k_proj.weight"], before[f"{mod_name}.add_k_proj.weight"])
            if getattr(mod, "norm_q", None) is not None:
                assert torch.equal(mod.norm_k.weight, mod.norm_q.weight)
            tied += 1
    assert tied >= 2


def test_sharpen_sharpens_and_refuses_models_without_attention():
    model = build_transformer("tiny-flux", seed=0)
    plain = _forward(model, "tiny-flux", 8, 8)
    sharpen_self_attention(model)
    assert not torch.allclose(_forward(model, "tiny-flux", 8, 8), plain)
    with pytest.raises(ValueError, match="no self-attention found in Linear"):
        sharpen_self_attention(torch.nn.Linear(4, 4))

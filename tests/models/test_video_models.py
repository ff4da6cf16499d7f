"""Video transformers: real configs (meta device), the size guard, tiny forwards in the pipelines'
layouts, and the sharpened-attention variant (self-attention tied, cross-attention untouched)."""

import pytest
import torch

from tomesd_ext.models import build_transformer, dit_call, get_dit_config, meta_transformer, parameter_count, sharpen_self_attention, text_conditioning
from tomesd_ext.models.video_configs import VIDEO_NAMES

# docs/bench.md, "Video transformers": width, heads x head dim, {block list: (count, params of block 0)}, total
REAL = {
    "wan-1.3b": (1536, 12, 128, {"blocks": (30, 46440704)}, 1418996800),
    "ltx": (2048, 32, 64, {"transformer_blocks": (28, 67155968)}, 1923385472),
    "hunyuan-video": (3072, 24, 128, {"transformer_blocks": (20, 339831296), "single_transformer_blocks": (40, 141591808)}, 12821012544),
    "hunyuan-video-depth4": (3072, 24, 128, {"transformer_blocks": (2, 339831296), "single_transformer_blocks": (2, 141591808)}, 1323560512),
}
TINY = [n for n in VIDEO_NAMES if n.startswith("tiny-")]
SELF = {"wan": [("blocks", "attn1")], "ltx-video": [("transformer_blocks", "attn1")],
        "hunyuan-video": [("transformer_blocks", "attn"), ("single_transformer_blocks", "attn")]}


def test_every_real_video_name_is_documented_here():
    assert set(REAL) == {n for n in VIDEO_NAMES if not n.startswith("tiny-")}


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_config_numbers(name):
    width, heads, head_dim, blocks, total = REAL[name]
    model = meta_transformer(name)
    family = get_dit_config(name)["family"]
    attn = getattr(getattr(model, SELF[family][0][0])[0], SELF[family][0][1])
    assert attn.heads == heads and attn.to_q.out_features == width == heads * head_dim
    for attr, (count, per_block) in blocks.items():
        assert len(getattr(model, attr)) == count and parameter_count(getattr(model, attr)[0]) == per_block
    assert parameter_count(model) == total


def test_full_hunyuan_video_is_refused_naming_the_reduced_variant():
    with pytest.raises(ValueError, match="use 'hunyuan-video-depth4'"):
        build_transformer("hunyuan-video")


def _forward(model, name, frames=5, h=8, w=10, batch=2):
    entry = get_dit_config(name)
    x = torch.randn(batch, entry["video"]["channels"], frames, h, w, generator=torch.Generator().manual_seed(0))
    cond = text_conditioning(entry["family"], entry["transformer"], batch, entry["text_tokens"], 0, halves=2)
    with torch.no_grad():
        return dit_call(model, entry["family"], x, 500, cond["text"], cond["pooled"])


@pytest.mark.parametrize("name", TINY)
def test_tiny_forward_keeps_the_video_latent_shape(name):
    out = _forward(build_transformer(name), name)
    assert out.shape == (2, get_dit_config(name)["video"]["channels"], 5, 8, 10)
    assert torch.isfinite(out).all() and out.std() > 0.1


@pytest.mark.parametrize("name", TINY)
def test_sharpen_ties_self_attention_only(name):
    model = build_transformer(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain = _forward(model, name)
    sharpen_self_attention(model)
    after = model.state_dict()
    tied = {f"{blocks}.{i}.{attr}" for blocks, attr in SELF[get_dit_config(name)["family"]] for i in range(len(getattr(model, blocks)))}
    for mod_name, mod in model.named_modules():
        if not isinstance(getattr(mod, "to_k", None), torch.nn.Linear):
            continue
        if mod_name in tied:  # key := query; qk RMSNorm: no scale
            assert torch.equal(mod.to_k.weight, mod.to_q.weight) and torch.equal(mod.to_k.bias, mod.to_q.bias)
            assert torch.equal(after[f"{mod_name}.to_q.weight"], before[f"{mod_name}.to_q.weight"])
        else:  # cross-attention, HunyuanVideo's token refiner
            assert torch.equal(after[f"{mod_name}.to_k.weight"], before[f"{mod_name}.to_k.weight"])
    changed = {k.rsplit(".", 2)[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == tied
    assert not torch.allclose(_forward(model, name), plain)

"""Tests of tomesd_ext.models: configs, tokenizer, seeded builders, pipelines, helpers."""

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from tomesd_ext.models import (
    build_pipeline,
    build_scheduler,
    build_text_encoders,
    build_tokenizer,
    build_unet,
    get_config,
    random_lora,
    sharpen_self_attention,
)

TINY = ["tiny", "tiny-sd2", "tiny-sdxl"]
PX = 64  # image side; latent 8 x 8


def _count(module):
    return sum(p.numel() for p in module.parameters())


def _unet_inputs(name, batch=1, side=PX // 8, seed=0):
    """Seeded UNet inputs (sample, timestep, encoder states, SDXL added conditions)."""
    gen = torch.Generator().manual_seed(seed)
    unet_cfg = get_config(name)["unet"]
    kwargs = {
        "sample": torch.randn(batch, 4, side, side, generator=gen),
        "timestep": torch.tensor(500),
        "encoder_hidden_states": torch.randn(batch, 77, unet_cfg["cross_attention_dim"], generator=gen),
    }
    if unet_cfg.get("addition_embed_type") == "text_time":
        proj = unet_cfg["projection_class_embeddings_input_dim"] - 6 * unet_cfg["addition_time_embed_dim"]
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, proj, generator=gen),
            "time_ids": torch.tensor([[PX, PX, 0, 0, PX, PX]] * batch, dtype=torch.float32),
        }
    return kwargs


def _forward(unet, name, seed=0):
    with torch.no_grad():
        return unet(**_unet_inputs(name, seed=seed)).sample


def _token_counts(unet, name):
    """Token counts N seen by each transformer block's self-attention in one forward."""
    counts = []
    hooks = [
        m.register_forward_pre_hook(lambda mod, args: counts.append(args[0].shape[1]))
        for m in unet.modules()
        if isinstance(m, BasicTransformerBlock)
    ]
    _forward(unet, name)
    for h in hooks:
        h.remove()
    return counts


# --- real configs -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, unet_params, text_params",
    [
        ("sd15", 859_520_964, [123_060_480]),
        ("sd21", 865_910_724, [340_387_840]),
        ("sdxl", 2_567_463_684, [123_060_480, 694_659_840]),
    ],
)
def test_real_configs_match_published_parameter_counts(name, unet_params, text_params):
    cfg = get_config(name)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg["unet"])
        vae = AutoencoderKL(**cfg["vae"])
        texts = [CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))]
        if cfg["text_encoder_2"]:
            texts.append(CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"])))
    assert _count(unet) == unet_params
    assert _count(vae) == 83_653_863
    assert [_count(t) for t in texts] == text_params


def test_real_config_details():
    assert get_config("sd21")["scheduler"]["prediction_type"] == "v_prediction"
    assert get_config("sd15")["scheduler"]["prediction_type"] == "epsilon"
    assert get_config("sdxl")["vae"]["scaling_factor"] == 0.13025
    assert get_config("sd15")["vae"]["scaling_factor"] == 0.18215
    assert get_config("sdxl")["unet"]["down_block_types"][0] == "DownBlock2D"
    with pytest.raises(KeyError):
        get_config("sd3")


def test_get_config_returns_a_copy():
    get_config("tiny")["unet"]["block_out_channels"].append(1)
    assert get_config("tiny")["unet"]["block_out_channels"] == [32, 64, 64]


@pytest.mark.slow
def test_sd15_unet_builds_with_seeded_weights():
    unet = build_unet("sd15")
    assert _count(unet) == 859_520_964
    w = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight
    assert torch.isfinite(w).all() and w.abs().max() <= 320 ** -0.5 and w.std() > 0


# --- tiny models --------------------------------------------------------------------------


@pytest.mark.parametrize("name", TINY)
def test_tiny_unet_forward(name):
    unet = build_unet(name)
    out = _forward(unet, name)
    assert out.shape == (1, 4, PX // 8, PX // 8)
    assert torch.isfinite(out).all() and out.std() > 0


def test_attention_levels_follow_the_real_topology():
    # SD1.x / SD2.x: transformer blocks at full resolution (d=1, 8x8) and at d=2 (4x4).
    assert {64, 16} <= set(_token_counts(build_unet("tiny"), "tiny"))
    assert {64, 16} <= set(_token_counts(build_unet("tiny-sd2"), "tiny-sd2"))
    # SDXL: none at full resolution, attention from d=2 on.
    counts = _token_counts(build_unet("tiny-sdxl"), "tiny-sdxl")
    assert 64 not in counts and 16 in counts


def test_same_seed_same_weights_and_global_rng_untouched():
    state = torch.get_rng_state()
    a, b, c = build_unet("tiny", seed=3), build_unet("tiny", seed=3), build_unet("tiny", seed=4)
    assert torch.equal(state, torch.get_rng_state())
    pa, pb, pc = (torch.cat([p.flatten() for p in m.parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb)
    assert not torch.equal(pa, pc)


def test_dtype_and_eval_mode():
    unet = build_unet("tiny", dtype=torch.bfloat16)
    assert unet.dtype == torch.bfloat16 and not unet.training


# --- tokenizer and text encoders ----------------------------------------------------------


def test_tokenizer_tokenizes_any_prompt():
    tok = build_tokenizer()
    for prompt in ["a photo of a cat riding a horse, 4k", "Ünïcödé ✨ 日本語 🐱", "", "x" * 500]:
        ids = tok(prompt, padding="max_length", max_length=77, truncation=True).input_ids
        assert len(ids) == 77 and ids[0] == tok.bos_token_id
        assert tok.eos_token_id in ids and max(ids) < len(tok)
    assert tok.model_max_length == 77
    assert len(tok("photo", add_special_tokens=False).input_ids) == 1


def test_tokenizer_written_to_given_path(tmp_path):
    tok = build_tokenizer(tmp_path / "tok")
    assert (tmp_path / "tok" / "vocab.json").exists() and (tmp_path / "tok" / "merges.txt").exists()
    assert tok("a dog").input_ids == build_tokenizer()("a dog").input_ids


def test_sdxl_text_encoders():
    parts = build_text_encoders("tiny-sdxl")
    assert set(parts) == {"text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"}
    ids = parts["tokenizer"]("a cat", padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        out = parts["text_encoder_2"](ids, output_hidden_states=True)
    assert out.text_embeds.shape == (1, 32)
    assert out.hidden_states[-2].shape == (1, 77, 32)


# --- schedulers and pipelines -------------------------------------------------------------


def test_schedulers():
    assert build_scheduler("tiny-sd2", "euler").config.prediction_type == "v_prediction"
    assert type(build_scheduler("sdxl", "default")).__name__ == "EulerDiscreteScheduler"
    assert build_scheduler("sd15", "pndm").config.beta_schedule == "scaled_linear"
    with pytest.raises(ValueError):
        build_scheduler("tiny", "unipc-typo")


def _image(seed=0):
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(PX, PX, 3) * 255).astype("uint8"))


def _run(pipe, kind, control_seed=0, **extra):
    kwargs = dict(
        prompt="a photo of a cat",
        num_inference_steps=2,
        height=PX,
        width=PX,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    if kind == "img2img":
        kwargs.update(image=_image(), strength=1.0)
        del kwargs["height"], kwargs["width"]
    elif kind == "inpaint":
        mask = Image.fromarray(np.pad(np.full((PX // 2, PX // 2), 255, np.uint8), PX // 4))
        kwargs.update(image=_image(), mask_image=mask, strength=1.0)
    elif kind == "controlnet":
        kwargs.update(image=_image(control_seed))
    kwargs.update(extra)
    return pipe(**kwargs).images


@pytest.mark.parametrize("name", ["tiny", "tiny-sdxl"])
@pytest.mark.parametrize("kind", ["txt2img", "img2img", "inpaint", "controlnet"])
def test_tiny_pipelines_run(name, kind):
    images = _run(build_pipeline(name, kind), kind)
    assert images.shape == (1, PX, PX, 3)
    assert np.isfinite(images).all() and images.std() > 0


def test_tiny_sd2_pipeline_latents():
    pipe = build_pipeline("tiny-sd2")
    for scheduler in ["ddim", "euler", "pndm"]:
        pipe.scheduler = build_scheduler("tiny-sd2", scheduler)
        assert pipe.scheduler.config.prediction_type == "v_prediction"
        latents = _run(pipe, "txt2img", output_type="latent")
        assert latents.shape == (1, 4, PX // 8, PX // 8) and torch.isfinite(latents).all()


def test_pipeline_is_deterministic():
    a = _run(build_pipeline("tiny", seed=1), "txt2img")
    b = _run(build_pipeline("tiny", seed=1), "txt2img")
    c = _run(build_pipeline("tiny", seed=2), "txt2img")
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_control_image_changes_the_result():
    pipe = build_pipeline("tiny", "controlnet")
    assert not np.allclose(_run(pipe, "controlnet", 0), _run(pipe, "controlnet", 1))


# --- helpers: sharpened attention, random LoRA --------------------------------------------


def test_sharpen_ties_query_and_key():
    unet = build_unet("tiny")
    block = unet.down_blocks[0].attentions[0].transformer_blocks[0]
    q0, k_cross = block.attn1.to_q.weight.clone(), block.attn2.to_k.weight.clone()
    before = _forward(unet, "tiny")
    assert sharpen_self_attention(unet, scale=2.0) is unet
    assert torch.equal(block.attn1.to_q.weight, 2 * q0)
    assert torch.equal(block.attn1.to_k.weight, block.attn1.to_q.weight)
    assert block.attn1.to_k.weight.data_ptr() != block.attn1.to_q.weight.data_ptr()
    assert torch.equal(block.attn2.to_k.weight, k_cross)
    assert not torch.allclose(_forward(unet, "tiny"), before)


def test_random_lora_changes_the_output():
    unet = build_unet("tiny-sdxl")
    before = _forward(unet, "tiny-sdxl")
    state = torch.get_rng_state()
    name = random_lora(unet, rank=4, seed=0)
    assert torch.equal(state, torch.get_rng_state())
    with_lora = _forward(unet, "tiny-sdxl")
    assert not torch.allclose(with_lora, before, atol=1e-4)
    unet.disable_adapters()
    assert torch.allclose(_forward(unet, "tiny-sdxl"), before, atol=1e-6)
    unet.enable_adapters()
    other = build_unet("tiny-sdxl")
    random_lora(other, rank=4, seed=0, adapter_name=name)
    assert torch.equal(_forward(other, "tiny-sdxl"), with_lora)


def test_random_lora_on_a_pipeline():
    pipe = build_pipeline("tiny")
    before = _run(pipe, "txt2img")
    random_lora(pipe)
    assert not np.allclose(_run(pipe, "txt2img"), before)


def test_cached_checkpoint_is_keyed_by_its_own_config(tmp_path, monkeypatch):
    """Written once per (config, builders): another model's config added or edited keeps the file
    (SD1.5 ones are 2 GB), a change to this model's config writes a new one."""
    from tomesd_ext.models import configs
    from tomesd_ext.models.checkpoint import cached_checkpoint

    first = cached_checkpoint(tmp_path, "tiny", seed=0)
    assert cached_checkpoint(tmp_path, "tiny", seed=0) == first
    monkeypatch.setitem(configs.CONFIGS, "sd15", {**configs.CONFIGS["sd15"], "note": "edited"})
    assert cached_checkpoint(tmp_path, "tiny", seed=0) == first
    tiny = configs.get_config("tiny")
    tiny["unet"]["norm_eps"] = 1e-6
    monkeypatch.setitem(configs.CONFIGS, "tiny", tiny)
    changed = cached_checkpoint(tmp_path, "tiny", seed=0)
    assert changed != first and len(list(tmp_path.glob("tiny-seed0-*.safetensors"))) == 2

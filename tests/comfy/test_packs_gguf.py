"""Our nodes on quantized diffusion models as ComfyUI users load them (COMFYUI_PATH, and
ComfyUI-GGUF from COMFYUI_PACKS_DIR): Flux.1, SD3.5, Wan 2.1 and Qwen-Image from a safetensors
file (ComfyUI's loader, also with UNETLoader's fp8 weight_dtype) and from GGUF files (Q8_0,
Q4_K) through ComfyUI-GGUF's "Unet Loader (GGUF)" (tests/comfy/quant_files.py).

Per family and loader: the weights stay as loaded (GGUF / fp8), the ToMe node at ratio 0 is bit
for bit the loaded model alone, at ratio 0.5 every attention call sees half the image tokens
(recorded by an attention override put on before our node). LoRA through ComfyUI's LoRA loader
on the GGUF model, our node before or after it. One workflow through the server: SD3.5 GGUF ->
LoraLoaderModelOnly -> our node -> KSampler.

Flux.1 and Qwen-Image run at their real width (ComfyUI's detection fixes it), 1 (+1 single)
block: on CPU, each GGUF or fp8 forward dequantizes about 0.4-0.55B weights, seconds each; so
UNETLoader's second fp8 type (e5m2) and kv mode run on the small families only.
"""

import json
import os

import pytest
import torch

from comfy_env import ComfyServer, importance_node, require_node_pack, tome_node
from dit_models import run_dit

pytestmark = pytest.mark.comfyui

SIGMA = 0.7
SMALL = ("sd35", "wan")
BIG = ("flux", "qwen")
CELLS = [(f, loader) for f in SMALL + BIG for loader in ("safetensors", "gguf-Q8_0", "gguf-Q4_K", "fp8_e4m3fn")]
CELLS += [(f, "fp8_e5m2") for f in SMALL]
# the importance node hooks attention and ComfyUI's post-CFG call, not the linear layers a loader
# quantizes: every cell on the small families; on the big ones (seconds a forward) one GGUF type
# (Q4_K: ComfyUI-GGUF's dequantizing ops, as Q8_0) and ComfyUI's own fp8 (the ToMe node runs them all)
IMPORTANCE_CELLS = [(f, loader) for f, loader in CELLS if f in SMALL or loader in ("gguf-Q4_K", "fp8_e4m3fn")]
_outputs = {}  # (family, loader) -> (plain, merged at ratio 0.5 seed 0): computed once, reused


@pytest.fixture(scope="module")
def qf():
    require_node_pack("ComfyUI-GGUF")
    import quant_files

    return quant_files


def _check_loaded(qf, model, loader):
    """The weights are what the loader makes of the file: GGUF blocks or fp8 stay so in the model."""
    kinds = qf.weight_kinds(model)
    if loader.startswith("gguf-"):
        quant = loader[len("gguf-"):]
        assert quant in kinds and not any(k.startswith("torch.") for k in kinds), kinds
        assert type(model).__name__ == "GGUFModelPatcher"
    elif loader.startswith("fp8_"):
        assert kinds == {f"torch.float8_{loader[len('fp8_'):]}"}, kinds
    else:
        assert all(k.startswith("torch.float") and "float8" not in k for k in kinds), kinds


def _check_lengths(family, seen, n_img, n_txt, mode="block"):
    """Every attention call of the merged run saw the image tokens halved: joint attention over
    [text, image] (Flux, SD3.5, Qwen-Image) or Wan's self attention (its cross attention: the
    halved queries against the text); kv mode: keys halved, queries whole."""
    half = n_img - n_img // 2
    assert seen
    for q_len, k_len in seen:
        if family == "wan":
            if k_len == n_txt:  # cross attention
                assert q_len == (half if mode == "block" else n_img), (q_len, k_len)
            else:
                assert (q_len, k_len) == ((half, half) if mode == "block" else (n_img, half)), (q_len, k_len)
        else:
            assert (q_len, k_len) == ((n_txt + half,) * 2 if mode == "block" else (n_txt + n_img, n_txt + half)), (q_len, k_len)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("family,loader", CELLS)
def test_tome_node_on_loaded_model(qf, family, loader):
    model = qf.load(family, loader)
    _check_loaded(qf, model, loader)
    x, ctx, conds = qf.inputs(family)
    plain = run_dit(model, x, SIGMA, ctx, **conds)
    assert torch.isfinite(plain).all()
    assert torch.equal(run_dit(tome_node(model, ratio=0.0), x, SIGMA, ctx, **conds), plain)
    with qf.attention_lengths(model) as (recorded, seen):
        merged = run_dit(tome_node(recorded, ratio=0.5), x, SIGMA, ctx, **conds)
    _check_lengths(family, seen, qf.image_tokens(family, x), ctx.shape[1])
    assert torch.isfinite(merged).all() and 1e-3 < _rel(merged, plain) < 0.8, _rel(merged, plain)
    _outputs[(family, loader)] = plain, merged


@pytest.mark.parametrize("family", SMALL)
@pytest.mark.parametrize("quant", ("Q8_0", "Q4_K"))
def test_kv_mode_on_gguf_model(qf, family, quant):
    model = qf.load(family, f"gguf-{quant}")
    x, ctx, conds = qf.inputs(family)
    plain = run_dit(model, x, SIGMA, ctx, **conds)
    assert torch.equal(run_dit(tome_node(model, ratio=0.0, dit_mode="kv"), x, SIGMA, ctx, **conds), plain)
    with qf.attention_lengths(model) as (recorded, seen):
        merged = run_dit(tome_node(recorded, ratio=0.5, dit_mode="kv"), x, SIGMA, ctx, **conds)
    _check_lengths(family, seen, qf.image_tokens(family, x), ctx.shape[1], mode="kv")
    assert torch.isfinite(merged).all() and 1e-4 < _rel(merged, plain) < 0.8


def _plain_and_merged(model, family, loader, x, ctx, conds):
    """The loaded model's output and the ToMe node's at ratio 0.5 (seed 0), computed once per cell."""
    if (family, loader) not in _outputs:
        _outputs[(family, loader)] = (run_dit(model, x, SIGMA, ctx, **conds),
                                      run_dit(tome_node(model, ratio=0.5), x, SIGMA, ctx, **conds))
    return _outputs[(family, loader)]


@pytest.mark.parametrize("family,loader", IMPORTANCE_CELLS)
def test_importance_node_on_loaded_model(qf, family, loader):
    """The importance node on the loaded transformer: exact at ratio 0 (small families); its first
    call (no map yet) is the ToMe node's merge bit for bit; after a CFG step hands ComfyUI's post-CFG hook its
    x0 predictions, the next call merges from the map, every attention call on half the image
    tokens."""
    model = qf.load(family, loader)
    x, ctx, conds = qf.inputs(family)
    plain, tome = _plain_and_merged(model, family, loader, x, ctx, conds)
    if family in SMALL:  # (the big ones: seconds a forward; ratio 0 is exact in-process for every family)
        assert torch.equal(run_dit(importance_node(model, ratio=0.0), x, SIGMA, ctx, **conds), plain)
    with qf.attention_lengths(model) as (recorded, seen):
        patched = importance_node(recorded, ratio=0.5)
        first = run_dit(patched, x, SIGMA, ctx, **conds)
        uncond, cond = (x - first * SIGMA).chunk(2)
        hook = patched.model_options["sampler_post_cfg_function"][0]
        hook({"denoised": cond, "cond_denoised": cond, "uncond_denoised": uncond, "cond_scale": 4.0,
              "sigma": torch.full((1,), SIGMA), "uncond": [{}], "cond": [{}], "input": x[:1]})
        second = run_dit(patched, x, SIGMA / 2, ctx, **conds)
    assert torch.equal(first, tome)
    assert hook.state.policy.counts["importance"] > 0 and hook.state.policy.hmap.shape[0] == 1
    _check_lengths(family, seen, qf.image_tokens(family, x), ctx.shape[1])
    assert torch.isfinite(second).all()


def _with_lora(model, lora):
    import comfy.sd

    return comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)[0]


@pytest.mark.parametrize("family,loader", [("sd35", "gguf-Q8_0"), ("sd35", "gguf-Q4_K"), ("wan", "gguf-Q8_0"),
                                           ("wan", "gguf-Q4_K"), ("flux", "gguf-Q8_0")])
def test_lora_on_gguf_model_before_or_after_node(qf, family, loader):
    """ComfyUI's LoRA loader (load_lora_for_models, what LoraLoaderModelOnly calls) on the GGUF
    model: its patches reach the quantized layers with our node before or after it, merged or
    not; the loaded model is left as it was."""
    model = qf.load(family, loader)
    x, ctx, conds = qf.inputs(family)
    plain, merged = _plain_and_merged(model, family, loader, x, ctx, conds)
    lora = qf.lora_state(model)
    lora_only = run_dit(_with_lora(model, lora), x, SIGMA, ctx, **conds)
    assert _rel(lora_only, plain) > 1e-2  # the LoRA applies to the quantized weights
    assert torch.equal(run_dit(tome_node(_with_lora(model, lora), ratio=0.0), x, SIGMA, ctx, **conds), lora_only)
    before = run_dit(tome_node(_with_lora(model, lora), ratio=0.5), x, SIGMA, ctx, **conds)
    after = run_dit(_with_lora(tome_node(model, ratio=0.5), lora), x, SIGMA, ctx, **conds)
    assert torch.equal(before, after)
    assert _rel(before, merged) > 1e-2  # the LoRA applies in the merged run too
    assert torch.equal(run_dit(model, x, SIGMA, ctx, **conds), plain)  # the loader's model is unchanged


# through the server ------------------------------------------------------------------------------

SIZE, STEPS = 64, 2


def _workflow(unet, lora, ratio):
    """SD3.5 txt2img on a GGUF UNet: UnetLoaderGGUF -> [LoraLoaderModelOnly] -> [our node] ->
    KSampler -> SaveLatent (lora / ratio None: that node left out); CLIP-L alone as the text
    encoder (CLIPLoader type sd3; ComfyUI pads its output to SD3's context width)."""
    prompt = {
        "unet": {"class_type": "UnetLoaderGGUF", "inputs": {"unet_name": unet}},
        "clip": {"class_type": "CLIPLoader", "inputs": {"clip_name": "clip_l.safetensors", "type": "sd3"}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse at sunset", "clip": ["clip", 0]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["clip", 0]}},
        "latent": {"class_type": "EmptySD3LatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "sampler": {"class_type": "KSampler", "inputs": {
            "seed": 42, "steps": STEPS, "cfg": 4.5, "sampler_name": "euler", "scheduler": "sgm_uniform", "denoise": 1.0,
            "model": ["unet", 0], "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0]}},
    }
    model = ["unet", 0]
    if lora is not None:
        prompt["lora"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": model, "lora_name": lora,
                                                                         "strength_model": 1.0}}
        model = ["lora", 0]
    if ratio is not None:
        prompt["tome"] = {"class_type": "TomesdExtTokenMerging", "inputs": {"model": model, "ratio": ratio,
                                                                           "min_tokens": 0}}
        model = ["tome", 0]
    prompt["sampler"]["inputs"]["model"] = model
    prompt["save"] = {"class_type": "SaveLatent", "inputs": {"samples": ["sampler", 0],
                                                              "filename_prefix": f"tests/gguf_{lora}_{ratio}"}}
    return prompt


def test_gguf_workflow_through_the_server(qf, tmp_path, monkeypatch):
    """SD3.5 Q4_K GGUF, 64 px, 2 steps, through ComfyUI-GGUF's loader and LoraLoaderModelOnly in
    a server with both packs: ratio 0 gives the latent of the graph without our node, ratio 0.5
    another; the LoRA changes the result."""
    from safetensors.torch import load_file, save_file

    import dit_files

    pack = require_node_pack("ComfyUI-GGUF")
    unet = qf.gguf_file("sd35", "Q4_K")
    lora_path = str(tmp_path / "sd35_lora.safetensors")
    save_file(qf.lora_state(qf.load("sd35", "gguf-Q4_K")), lora_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny model: threads only wait on each other (more so on a busy machine)
    server = ComfyServer(str(tmp_path / "base"), packs=[pack])
    try:
        server.add_model("diffusion_models", "sd35_random-Q4_K.gguf", unet)
        os.makedirs(os.path.join(server.base, "models", "loras"), exist_ok=True)
        server.add_model("loras", "sd35_lora.safetensors", lora_path)
        server.add_model("text_encoders", "clip_l.safetensors", dit_files.clip_file("l"))
        server.wait_ready()
        info = server.get("/object_info")
        assert "UnetLoaderGGUF" in info, "ComfyUI-GGUF did not load"
        defaults = {name: spec[1]["default"] for name, spec in info["TomesdExtTokenMerging"]["input"]["required"].items()
                    if name != "model"}

        def run(lora, ratio):
            prompt = _workflow("sd35_random-Q4_K.gguf", lora, ratio)
            if "tome" in prompt:
                prompt["tome"]["inputs"] = dict(defaults, **prompt["tome"]["inputs"])
            entry = server.run_prompt(json.loads(json.dumps(prompt)))
            (saved,) = [f for out in entry["outputs"].values() for f in out.get("latents", [])]
            path = os.path.join(server.base, "output", saved.get("subfolder", ""), saved["filename"])
            return load_file(path)["latent_tensor"]

        plain = run("sd35_lora.safetensors", None)
        assert plain.shape == (1, 16, SIZE // 8, SIZE // 8) and torch.isfinite(plain).all()
        assert torch.equal(run("sd35_lora.safetensors", 0.0), plain)
        assert not torch.equal(run("sd35_lora.safetensors", 0.5), plain)
        assert not torch.equal(run(None, None), plain)  # the LoRA applied
        log = server.read_log()
        assert "gguf qtypes:" in log and "Q4_K" in log
        assert "tomesd-ext: token merging skipped" not in log
    finally:
        server.stop()

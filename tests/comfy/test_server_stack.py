"""The stacking workflow (example_workflows/sd15_txt2img_tome_easycache_compile.json, API copy
tests/comfy/workflows/sd15_txt2img_tome_easycache_compile.api.json) in the real ComfyUI: Load
Checkpoint -> TorchCompileModel (inductor) -> our ToMe node -> EasyCache -> KSampler. At test size
(64 px, 8 steps, min_tokens 0 so the 8x8 latent merges) it must run with both active: EasyCache
logs skipped steps, and the sampled latents are those of our node (the same graph without the
compile node, eager, gives them to float noise; with ToMe at ratio 0 they differ by far more).

The checkpoint is the one-level SD1.5-width one (CKPT_1LEVEL_NAME: real widths, attention at the
merged level, full VAE and text encoder; ComfyUI loads it as SD1.5): inductor compiling the whole
SD1.5 UNet on a cold cache took 3.5-15 minutes of a 2-core machine, a one-level UNet a fraction of
that, and the graph (nodes, order, inputs) is the shipped one."""

import os
import re

import pytest
import torch

from comfy_env import TOME_SIMPLE, as_advanced_tome, load_workflow, tome_key
from conftest import CKPT_1LEVEL_NAME

pytestmark = pytest.mark.comfyui

NAME = "sd15_txt2img_tome_easycache_compile"
SIZE, STEPS = 64, 8  # EasyCache needs a few steps inside its window before it can skip one


def _node(prompt, class_type):
    return next(k for k, v in prompt.items() if v["class_type"] == class_type)


def _run(server, compiled=True, ratio=None, prefix="tests/stack"):
    """The API copy at test size; compiled False: without TorchCompileModel; ratio: ToMe's.
    Returns (latents, the log lines of this run)."""
    from safetensors.torch import load_file

    prompt = load_workflow(f"{NAME}.api.json")
    tome, sampler = tome_key(prompt), _node(prompt, "KSampler")
    prompt[_node(prompt, "CheckpointLoaderSimple")]["inputs"]["ckpt_name"] = CKPT_1LEVEL_NAME
    prompt[_node(prompt, "EmptyLatentImage")]["inputs"].update(width=SIZE, height=SIZE)
    prompt[_node(prompt, "SaveImage")]["inputs"]["filename_prefix"] = prefix
    prompt[sampler]["inputs"]["steps"] = STEPS
    as_advanced_tome(prompt[tome], min_tokens=0)  # the shipped simple node has no min_tokens
    if ratio is not None:
        prompt[tome]["inputs"]["ratio"] = ratio
    if not compiled:
        compile_node = _node(prompt, "TorchCompileModel")
        prompt[tome]["inputs"]["model"] = prompt[compile_node]["inputs"]["model"]
        del prompt[compile_node]
    prompt["tomesd_ext_save_latent"] = {"class_type": "SaveLatent", "inputs": {"samples": [sampler, 0], "filename_prefix": prefix}}
    start = len(server.read_log())
    entry = server.run_prompt(prompt, timeout=600)
    (image,) = server.output_files(entry)
    from PIL import Image

    with Image.open(image) as img:
        assert img.size == (SIZE, SIZE)
    (saved,) = [f for out in entry["outputs"].values() for f in out.get("latents", [])]
    latents = load_file(os.path.join(server.base, "output", saved.get("subfolder", ""), saved["filename"]))["latent_tensor"]
    return latents, server.read_log()[start:]


def _skipped(log):
    found = re.findall(r"EasyCache - skipped (\d+)/(\d+) steps", log)
    assert len(found) == 1, log[-3000:]
    skipped, total = map(int, found[0])
    assert total == STEPS
    return skipped


def test_tome_easycache_and_compile_in_one_graph(sd15_1level_server):
    server = sd15_1level_server
    shipped = load_workflow(f"{NAME}.api.json")
    assert [shipped[k]["class_type"] for k in sorted(shipped, key=int)][:4] == [
        "CheckpointLoaderSimple", "TorchCompileModel", TOME_SIMPLE, "EasyCache"]
    assert shipped[_node(shipped, "TorchCompileModel")]["inputs"]["backend"] == "inductor"

    compiled, log = _run(server, prefix="tests/stack_compiled")
    assert _skipped(log) > 0  # EasyCache skipped steps in the compiled, merged run
    assert "tomesd-ext: token merging skipped" not in log
    eager, log = _run(server, compiled=False, prefix="tests/stack_eager")
    assert _skipped(log) > 0
    unmerged, _log = _run(server, compiled=False, ratio=0.0, prefix="tests/stack_ratio0")
    assert compiled.shape == (1, 4, SIZE // 8, SIZE // 8) and torch.isfinite(compiled).all()
    noise = (compiled - eager).abs().mean().item()
    merging = (eager - unmerged).abs().mean().item()
    print(f"STACK latents: compiled vs eager mean |diff| {noise:.3g}; merged vs ratio 0 {merging:.3g}")
    assert merging > 1e-3 and noise < 0.1 * merging  # compiled = our merged result, not the unmerged one

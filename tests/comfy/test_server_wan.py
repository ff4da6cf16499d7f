"""The shipped Wan 2.1 text-to-video workflow (example_workflows/wan21_t2v_tome.json, API copy
tests/comfy/workflows/wan21_t2v_tome.api.json) in the real ComfyUI, on seeded random-weight files
under the names it expects (wan_files.py: umT5-XXL at full size in fp8, zero blocks, the Wan model at the 1.3B
width with 2 blocks, a narrow Wan VAE), at a test size: 96x64, 9 frames (3 latent frames of 6x4
tokens), 2 steps. The text encoding dominates (ComfyUI pads every prompt to 512 umT5 tokens): the
server peaks at about 12 GB, and the test took 7.4 min on a shared 2-core machine with three other
heavy jobs, 2.0 min at load ~1-2 (2026-12-07)."""

import os

import pytest

from comfy_env import ComfyServer, as_advanced_tome, comfyui_path, load_workflow, tome_key
from wan_files import wan_files

pytestmark = pytest.mark.comfyui

WIDTH, HEIGHT, LENGTH, STEPS = 96, 64, 9, 2


@pytest.fixture(scope="module")
def wan_server(tmp_path_factory):
    cache = os.environ.get("TOMESD_EXT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tomesd_ext")
    files = wan_files(os.path.join(cache, "wan_random-v2"), comfyui_path())  # v2: sparse umT5 (zero blocks)
    base = str(tmp_path_factory.mktemp("comfyui_wan"))
    for sub, path in files.items():
        os.makedirs(os.path.join(base, "models", sub), exist_ok=True)
        os.symlink(path, os.path.join(base, "models", sub, os.path.basename(path)))
    server = ComfyServer(base)
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def _prompt(tome, prefix):
    """The API copy at test size; tome: the ToMe node's changed inputs, or None for no node."""
    prompt = load_workflow("wan21_t2v_tome.api.json")
    node = tome_key(prompt)
    sampler = next(k for k, v in prompt.items() if v["class_type"] == "KSampler")
    for v in prompt.values():
        if v["class_type"] == "EmptyHunyuanLatentVideo":
            v["inputs"].update(width=WIDTH, height=HEIGHT, length=LENGTH)
        if v["class_type"] == "SaveAnimatedWEBP":
            v["inputs"]["filename_prefix"] = prefix
    prompt[sampler]["inputs"]["steps"] = STEPS
    if tome is None:
        prompt[sampler]["inputs"]["model"] = prompt[node]["inputs"]["model"]
        del prompt[node]
    else:
        as_advanced_tome(prompt[node], **tome)
    prompt["save_latent"] = {"class_type": "SaveLatent", "inputs": {"samples": [sampler, 0], "filename_prefix": prefix}}
    return prompt


def test_wan_workflow_runs_merges_and_ratio_zero_equals_no_node(wan_server):
    from PIL import Image
    from safetensors.torch import load_file

    def run(tome, prefix):
        entry = wan_server.run_prompt(_prompt(tome, prefix), timeout=1200)
        (webp,) = wan_server.output_files(entry)
        with Image.open(webp) as img:
            assert (img.n_frames, img.size) == (LENGTH, (WIDTH, HEIGHT))
        (saved,) = [f for out in entry["outputs"].values() for f in out.get("latents", [])]
        path = os.path.join(wan_server.base, "output", saved.get("subfolder", ""), saved["filename"])
        return load_file(path)["latent_tensor"]

    merged = run({"min_tokens": 0}, "tests/wan_merged")  # the shipped ratio 0.5, st 2
    off = run({"min_tokens": 0, "ratio": 0.0}, "tests/wan_off")
    plain = run(None, "tests/wan_plain")
    assert merged.shape == plain.shape == (1, 16, 3, HEIGHT // 8, WIDTH // 8)
    assert plain.isfinite().all() and merged.isfinite().all()
    assert (off == plain).all()
    change = ((merged - plain).norm() / plain.norm()).item()
    print(f"WAN latents: merged vs no node relative difference {change:.4f}")
    assert change > 1e-3
    log = wan_server.read_log()
    assert "are not merged" not in log and "below min_tokens" not in log

"""Our nodes beside ComfyUI-AnimateDiff-Evolved (the real pack, COMFYUI_PACKS_DIR) in a running
ComfyUI: the shipped workflow sd15_animatediff_tome (Load AnimateDiff Model -> Apply AnimateDiff
Model -> Use Evolved Sampling with 16-frame context windows) on the random SD 1.5 checkpoint and a
random-weight v3 motion module (animatediff_files.py), at 64 px, 2 steps, 6 frames in 4-frame
context windows overlapping by 2 (two windows per step; the shipped 24 frames in 16-frame windows
are the same code path at four times the cost). Six sampler runs in all, each a prompt of its own
(ComfyUI reruns only what changed).

Compared on the sampled latents (a SaveLatent node is added): ratio 0 equals AnimateDiff alone bit
for bit, merging changes the result, our node before or after Use Evolved Sampling gives the same
latents, and the importance node runs there too. The SD 1.5 checkpoint is full size and the
motion module ~0.8 GB (the server runs the UNet in bf16 to stay near 4 GB): run under
``flock /tmp/tomesd_heavy.lock`` on shared machines.
"""

import json
import os

import pytest
import torch

from animatediff_files import MOTION_MODULE_NAME, cached_motion_module
from comfy_env import ComfyServer, as_advanced_tome, load_workflow, node_defaults, require_node_pack, tome_key, ui_to_api
from conftest import CKPT_NAME

import nodes

pytestmark = pytest.mark.comfyui
NAME = "sd15_animatediff_tome"
PACK = "ComfyUI-AnimateDiff-Evolved"
SIZE, STEPS, FRAMES, WINDOW, OVERLAP = 64, 2, 6, 4, 2


@pytest.fixture(scope="module")
def ad_server(tmp_path_factory, sd15_checkpoint):
    pack = require_node_pack(PACK)
    # UNet and motion module weights in bf16 (computed in fp32): ~4.3 GB resident instead of ~6.6 GB
    server = ComfyServer(str(tmp_path_factory.mktemp("comfyui_ad")), packs=[pack], args=["--bf16-unet"])
    try:
        server.add_checkpoint(CKPT_NAME, sd15_checkpoint)
        os.makedirs(os.path.join(server.base, "models", "animatediff_models"), exist_ok=True)
        server.add_model("animatediff_models", MOTION_MODULE_NAME, cached_motion_module())
        server.wait_ready()
        yield server
    finally:
        server.stop()


def _node(prompt, class_type):
    return next(k for k, v in prompt.items() if v["class_type"] == class_type)


def _small(prefix, **tome):
    """The shipped workflow at test size, with a SaveLatent after the sampler; tome: our node's inputs."""
    prompt = load_workflow(f"{NAME}.api.json")
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = CKPT_NAME
        if node["class_type"] == "EmptyLatentImage":
            inputs.update(width=SIZE, height=SIZE, batch_size=FRAMES)
        if node["class_type"] == "ADE_StandardUniformContextOptions":
            inputs.update(context_length=WINDOW, context_overlap=OVERLAP)
        if node["class_type"] == "KSampler":
            # "simple" puts the 2 steps at sigma_max and sigma(t~500) ("normal" puts the second at
            # sigma_min, where a changed noise prediction barely moves the result): the second
            # step, the first that importance mode plans from a map, then shows in the latents
            inputs.update(steps=STEPS, scheduler="simple")
        if "filename_prefix" in inputs:
            inputs["filename_prefix"] = prefix
    # the shipped simple node as the advanced one at its defaults, min_tokens 0: merge the 8x8 latent
    as_advanced_tome(prompt[tome_key(prompt)], min_tokens=0, **tome)
    prompt["save_latent"] = {"class_type": "SaveLatent",
                             "inputs": {"samples": [_node(prompt, "KSampler"), 0], "filename_prefix": prefix}}
    return prompt


def _place_ours(prompt, where):
    """Our node in the MODEL chain: "after" Use Evolved Sampling (as shipped: checkpoint -> Use
    Evolved Sampling -> ours -> KSampler), "before" it (checkpoint -> ours -> Use Evolved
    Sampling -> KSampler), or None (left out: AnimateDiff alone)."""
    ours = tome_key(prompt)
    evolved = _node(prompt, "ADE_UseEvolvedSampling")
    sampler = _node(prompt, "KSampler")
    checkpoint = [_node(prompt, "CheckpointLoaderSimple"), 0]
    if where is None:
        prompt[evolved]["inputs"]["model"] = checkpoint
        prompt[sampler]["inputs"]["model"] = [evolved, 0]
        del prompt[ours]
    elif where == "before":
        prompt[ours]["inputs"]["model"] = checkpoint
        prompt[evolved]["inputs"]["model"] = [ours, 0]
        prompt[sampler]["inputs"]["model"] = [evolved, 0]
    else:
        prompt[evolved]["inputs"]["model"] = checkpoint
        prompt[ours]["inputs"]["model"] = [evolved, 0]
        prompt[sampler]["inputs"]["model"] = [ours, 0]
    return prompt


def _as_importance(prompt):
    """The importance node (its defaults, min_tokens 0) in the ToMe node's place."""
    ours = tome_key(prompt)
    cls = nodes.NODE_DEFINITIONS["TomesdExtImportanceMerging"]
    prompt[ours] = {"class_type": "TomesdExtImportanceMerging",
                    "inputs": {**node_defaults(cls, min_tokens=0), "model": prompt[ours]["inputs"]["model"]}}
    return prompt


@pytest.fixture(scope="module")
def plain(ad_server):
    """The latents of AnimateDiff alone (no node of ours)."""
    return _latents(ad_server, _place_ours(_small("tests/ad_plain"), None))[1]


def _latents(server, prompt):
    from safetensors.torch import load_file

    entry = server.run_prompt(prompt)
    (saved,) = [f for out in entry["outputs"].values() for f in out.get("latents", [])]
    path = os.path.join(server.base, "output", saved.get("subfolder", ""), saved["filename"])
    return entry, load_file(path)["latent_tensor"]


def _rel(a, b):
    return float((a - b).abs().mean() / b.abs().mean())


@pytest.fixture(scope="module")
def merged(ad_server):
    """The shipped graph (ToMe ratio 0.5 after Use Evolved Sampling): its history entry and latents."""
    return _latents(ad_server, _small("tests/ad_workflow"))


def test_workflow_runs_over_context_windows_and_saves_the_animation(ad_server, merged):
    from PIL import Image

    entry, latents = merged
    assert latents.shape == (FRAMES, 4, SIZE // 8, SIZE // 8) and torch.isfinite(latents).all()
    (webp,) = ad_server.output_files(entry)
    with Image.open(webp) as img:
        assert (img.n_frames, img.size) == (FRAMES, (SIZE, SIZE))
    log = ad_server.read_log()
    print("\n".join(line for line in log.splitlines() if "Prompt executed" in line))
    assert "tomesd-ext: token merging skipped" not in log
    assert f"tomesd-ext: AnimateDiff frames: {WINDOW}-frame calls of a {FRAMES}-frame clip, frame_plan=shared" in log
    assert f"Sliding context window sampling activated - latents passed in ({FRAMES}) greater than context_length {WINDOW}" in log
    failed = [line for line in log.splitlines() if "IMPORT FAILED" in line and ("tomesd-ext" in line or PACK in line)]
    assert not failed, failed


def test_ratio0_is_animatediff_alone_and_both_orders_agree(ad_server, merged, plain):
    _e, merged = merged
    _e, before = _latents(ad_server, _place_ours(_small("tests/ad_before"), "before"))
    _e, off = _latents(ad_server, _small("tests/ad_off", ratio=0.0))
    print(f"AD latents: ratio 0.5 vs AnimateDiff alone, relative mean |diff| {_rel(merged, plain):.4f}; "
          f"node before Use Evolved Sampling vs after: max |diff| {(before - merged).abs().max():.3g}")
    assert torch.equal(off, plain)
    assert _rel(merged, plain) > 1e-3
    assert torch.equal(before, merged)


def test_importance_node_with_animatediff_context_windows(ad_server, merged, plain):
    """The importance node in the ToMe node's place, after or before Use Evolved Sampling (the
    same latents); it changes the result, and differently from ToMe."""
    _e, tome = merged
    _e, after = _latents(ad_server, _as_importance(_small("tests/ad_imp")))
    _e, before = _latents(ad_server, _as_importance(_place_ours(_small("tests/ad_imp_before"), "before")))
    print(f"AD importance latents: vs AnimateDiff alone {_rel(after, plain):.4f}, vs ToMe {_rel(after, tome):.4f}")
    assert torch.equal(before, after)
    assert _rel(after, plain) > 1e-3 and _rel(after, tome) > 5e-5  # measured 0.0300 and 0.0003


def test_ui_workflow_matches_object_info_and_its_api_twin(ad_server):
    prompt, problems = ui_to_api(load_workflow(f"{NAME}.json"), ad_server.get("/object_info"))
    assert not problems, problems
    api = load_workflow(f"{NAME}.api.json")
    assert {k: (v["class_type"], v["inputs"]) for k, v in prompt.items()} == {
        k: (v["class_type"], v["inputs"]) for k, v in api.items()
    }


def test_the_shipped_workflow_names_the_files_its_note_names():
    graph = load_workflow(f"{NAME}.json")
    note = " ".join(n["widgets_values"][0] for n in graph["nodes"] if n["type"] == "Note")
    api = load_workflow(f"{NAME}.api.json")
    for key in (_node(api, "CheckpointLoaderSimple"), _node(api, "ADE_LoadAnimateDiffModel")):
        name = next(v for k, v in api[key]["inputs"].items() if k in ("ckpt_name", "model_name"))
        assert name in note, name
    assert "animatediff_models" in note
    assert json.dumps(api).count("TomesdExtTokenMerging") == 1

"""Our pack inside a running ComfyUI (COMFYUI_PATH): /object_info, every shipped workflow run
(API format) and every UI workflow validated against /object_info, plus the PNG outputs."""

import json
import os

import pytest
import torch

from comfy_env import TOME_SIMPLE, API_COPIES, EXAMPLES, as_advanced_tome, load_workflow, tome_key, ui_to_api, workflow_packs
from conftest import CKPT_NAME

import nodes

pytestmark = pytest.mark.comfyui
# workflows that need other node packs run on a server with them (test_server_animatediff.py)
API_FILES = sorted(f for f in os.listdir(API_COPIES) if f.endswith(".api.json") and not workflow_packs(f))
# the SD workflows run here on the random SD 1.5 checkpoint; the transformer workflows need their own
# files (test_dit_workflow_runs_on_random_files here, the Wan one in test_server_wan.py); the
# stacking workflow (EasyCache + TorchCompileModel) runs in test_server_stack.py
SD_API_FILES = [f for f in API_FILES if "CheckpointLoaderSimple" in open(os.path.join(API_COPIES, f)).read()
                and f not in ("flux1_txt2img_tome.api.json", "sd35_txt2img_tome.api.json",
                              # compiles the UNet with inductor: run once, in test_server_stack.py
                              "sd15_txt2img_tome_easycache_compile.api.json")]
UI_FILES = sorted(f for f in os.listdir(EXAMPLES) if f.endswith(".json") and not workflow_packs(f))
SIZE = int(os.environ.get("TOMESD_EXT_TEST_SIZE", "64"))
STEPS = int(os.environ.get("TOMESD_EXT_TEST_STEPS", "2"))


def test_object_info_lists_our_nodes_with_declared_inputs(object_info, comfy_server):
    failed = [line for line in comfy_server.read_log().splitlines() if "IMPORT FAILED" in line and "tomesd-ext" in line]
    assert not failed, failed
    for node_id, cls in nodes.NODE_DEFINITIONS.items():
        assert node_id in object_info, f"{node_id} missing from /object_info"
        info = object_info[node_id]
        assert info["category"] == cls.CATEGORY
        assert info["output"] == list(cls.RETURN_TYPES)
        declared = cls.INPUT_TYPES()["required"]
        served = info["input"]["required"]
        assert list(served) == list(declared)
        for name, (kind, spec) in declared.items():
            if isinstance(kind, list):  # a combo, as the V3 API serves it
                assert served[name][0] == "COMBO" and served[name][1]["options"] == kind, name
            else:
                assert served[name][0] == kind, name
            for key in ("default", "min", "max", "tooltip", "control_after_generate"):
                if key in spec:
                    assert served[name][1][key] == spec[key], (name, key)


def _small(prompt, prefix):
    """The shipped workflow at test size on our random SD1.5 checkpoint."""
    prompt = json.loads(json.dumps(prompt))
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = CKPT_NAME
        if node["class_type"] in ("EmptyLatentImage", "ImageScale"):
            inputs["width"] = inputs["height"] = SIZE
        if "steps" in inputs:
            inputs["steps"] = STEPS
        if node["class_type"] in ("SaveImage", "SaveVideo"):
            inputs["filename_prefix"] = prefix
        if node["class_type"] == "LoadVideo":
            inputs["file"] = CLIP_NAME
        if node["class_type"] == TOME_SIMPLE:  # it has no min_tokens: as the advanced node at its defaults
            as_advanced_tome(node)
        if node["class_type"] in nodes.NODE_DEFINITIONS and "min_tokens" in node["inputs"]:
            node["inputs"]["min_tokens"] = 0  # merge at test size too (64 px = an 8x8 latent)
    return prompt


CLIP_NAME, CLIP_FRAMES = "tomesd_ext_test_clip.mp4", 5


def _provide_input_clip(server):
    """The video workflows' input: our synthetic moving-shapes clip as an mp4 in ComfyUI's input dir."""
    from tomesd_ext.video.io import write_mp4
    from tomesd_ext.video.synthetic import moving_shapes

    path = os.path.join(server.base, "input", CLIP_NAME)
    if not os.path.exists(path):
        write_mp4(moving_shapes(n_frames=CLIP_FRAMES, size=96, seed=0), path, fps=8)


def _frames_and_size(path):
    """(number of frames, (width, height)) of a saved image or video."""
    if path.endswith(".mp4"):
        import av

        with av.open(path) as container:
            frames = [f for f in container.decode(video=0)]
        return len(frames), (frames[0].width, frames[0].height)
    from PIL import Image

    with Image.open(path) as img:
        return 1, img.size


@pytest.mark.parametrize("name", SD_API_FILES)
def test_api_workflow_runs_and_saves_images(sd15_server, name):
    comfy_server = sd15_server
    """SDXL workflows run here on the SD1.5 random checkpoint (no SDXL weights are available
    offline): this checks the graph and our node inside it, not SDXL itself."""
    prompt = _small(load_workflow(name), "tests/" + name.split(".")[0])
    video = any(node["class_type"] == "LoadVideo" for node in prompt.values())
    if video:
        _provide_input_clip(comfy_server)
    entry = comfy_server.run_prompt(prompt)
    files = comfy_server.output_files(entry)
    assert files, f"{name} produced no images"
    for path in files:
        frames, size = _frames_and_size(path)
        assert size == (SIZE, SIZE)
        assert frames == (CLIP_FRAMES if video else 1), path
    log = comfy_server.read_log()
    assert "tomesd-ext: token merging skipped" not in log and "cfg = 1 (no unconditional pass)" not in log


@pytest.mark.parametrize("name", UI_FILES)
def test_ui_workflow_matches_object_info_and_its_api_twin(object_info, name):
    graph = load_workflow(name)
    prompt, problems = ui_to_api(graph, object_info)
    assert not problems, problems
    api = load_workflow(name.replace(".json", ".api.json"))
    assert {k: (v["class_type"], v["inputs"]) for k, v in prompt.items()} == {
        k: (v["class_type"], v["inputs"]) for k, v in api.items()
    }


def test_merge_mlp_object_patches_are_undone_between_runs(sd15_server):
    comfy_server = sd15_server
    """merge_mlp swaps each block's ff through ModelPatcher object patches: a later run of the
    same model without the node must give exactly the baseline image again."""
    import numpy as np
    from PIL import Image

    base = load_workflow("sd15_txt2img_tome.api.json")

    def run(tome, prefix):
        prompt = _small(base, prefix)
        if tome is None:
            prompt["6"]["inputs"]["model"] = ["1", 0]
            del prompt["2"]
        else:
            prompt["2"]["inputs"].update(tome)
        (path,) = comfy_server.output_files(comfy_server.run_prompt(prompt))
        return np.asarray(Image.open(path))

    # ratio 0 is bit-identical to no node (see test_inprocess) and, being another graph than
    # the plain one, keeps ComfyUI's cache from answering the last run.
    off = run({"ratio": 0.0}, "tests/ratio0")
    merged = run({"merge_mlp": True, "merge_crossattn": True, "ratio": 0.6, "min_tokens": 0}, "tests/mlp")
    plain = run(None, "tests/plain")
    assert not np.array_equal(off, merged)
    assert np.array_equal(off, plain)


def test_vid2vid_vidtome_merges_and_nothing_merged_equals_no_node(sd15_server):
    """In the served video workflow VidToMe changes the result; with chunk_size 1 and both
    ratios 0 (plain per-frame attention) the sampled latents equal those made without the node.

    Compared on the KSampler's latents (a SaveLatent node is added), not on the mp4: ComfyUI
    sizes VAEDecode's batches by free memory, so which frames are decoded together (and the
    float rounding that an mp4 encoder then amplifies) varies from run to run with the machine's
    memory, independently of any model patch.
    """
    from safetensors.torch import load_file

    comfy_server = sd15_server
    _provide_input_clip(comfy_server)
    base = load_workflow("sd15_vid2vid_vidtome.api.json")
    vid = next(k for k, v in base.items() if v["class_type"] == "TomesdExtVidToMe")
    sampler = next(k for k, v in base.items() if v["class_type"] == "KSampler")

    def run(settings, prefix):
        prompt = _small(base, prefix)
        if settings is None:
            prompt[sampler]["inputs"]["model"] = prompt[vid]["inputs"]["model"]
            del prompt[vid]
        else:
            prompt[vid]["inputs"].update(settings)
        prompt["tomesd_ext_save_latent"] = {"class_type": "SaveLatent",
                                            "inputs": {"samples": [sampler, 0], "filename_prefix": prefix}}
        entry = comfy_server.run_prompt(prompt)
        (video,) = comfy_server.output_files(entry)
        assert _frames_and_size(video) == (CLIP_FRAMES, (SIZE, SIZE))
        (saved,) = [f for out in entry["outputs"].values() for f in out.get("latents", [])]
        path = os.path.join(comfy_server.base, "output", saved.get("subfolder", ""), saved["filename"])
        return load_file(path)["latent_tensor"]

    off = run({"chunk_size": 1, "local_ratio": 0.0, "global_ratio": 0.0}, "tests/vid_off")
    merged = run({"chunk_size": 4, "local_ratio": 0.9, "global_ratio": 0.8}, "tests/vid_merged")
    plain = run(None, "tests/vid_plain")
    assert off.shape == merged.shape == plain.shape == (CLIP_FRAMES, 4, SIZE // 8, SIZE // 8)
    change = (merged - plain).abs().mean() / plain.abs().mean()
    print(f"VIDTOME latents: nothing merged vs no node max |diff| {(off - plain).abs().max():.3g}; "
          f"merged vs no node relative mean |diff| {change:.4f}")
    assert torch.equal(off, plain)
    assert change > 1e-3


@pytest.mark.parametrize("name", ["sd35_txt2img_tome", "flux1_txt2img_tome"])
def test_dit_workflow_runs_on_random_files(comfy_server, name):
    """A transformer workflow as shipped, on random-weight files under the names it expects
    (tests/comfy/dit_files.py; SD3.5: a 2-block MMDiT + the full-size 16-channel VAE as
    sd3.5_large.safetensors, full-size CLIP-L and CLIP-bigG; Flux.1-dev: a 3072-wide Flux with 1
    double + 1 single block, full-size T5-XXL in fp8, CLIP-L, the 16-channel VAE). Only widget
    values change: the latent size (64 px), steps (2), min_tokens 0 (so the 4x4 token grid
    merges), the ToMe ratio, the file prefix. The sampler's latents (a SaveLatent node is added):
    ratio 0 equals the graph without the node, the workflow's ratio 0.5 differs from it; the
    saved image is 64x64."""
    from safetensors.torch import load_file

    import dit_files

    for folder, file_name, path in (dit_files.sd35_files() if name.startswith("sd35") else dit_files.flux_files()):
        comfy_server.add_model(folder, file_name, path)
    base = load_workflow(f"{name}.api.json")
    tome = tome_key(base)
    sampler = next(k for k, v in base.items() if v["class_type"] == "KSampler")

    def run(ratio, prefix):
        prompt = json.loads(json.dumps(base))
        for node in prompt.values():
            inputs = node["inputs"]
            if node["class_type"] == "EmptySD3LatentImage":
                inputs["width"] = inputs["height"] = SIZE
            if node["class_type"] == "SaveImage":
                inputs["filename_prefix"] = prefix
        prompt[sampler]["inputs"]["steps"] = STEPS
        if ratio is None:
            prompt[sampler]["inputs"]["model"] = prompt[tome]["inputs"]["model"]
            del prompt[tome]
        else:
            as_advanced_tome(prompt[tome], ratio=ratio, min_tokens=0)
        prompt["tomesd_ext_save_latent"] = {"class_type": "SaveLatent",
                                            "inputs": {"samples": [sampler, 0], "filename_prefix": prefix}}
        entry = comfy_server.run_prompt(prompt)
        (image,) = comfy_server.output_files(entry)
        assert _frames_and_size(image) == (1, (SIZE, SIZE))
        (saved,) = [f for out in entry["outputs"].values() for f in out.get("latents", [])]
        return load_file(os.path.join(comfy_server.base, "output", saved.get("subfolder", ""), saved["filename"]))["latent_tensor"]

    merged = run(base[tome]["inputs"]["ratio"], f"tests/{name}_merged")
    off = run(0.0, f"tests/{name}_off")
    plain = run(None, f"tests/{name}_plain")
    assert plain.shape == (1, 16, SIZE // 8, SIZE // 8) and torch.isfinite(plain).all()
    assert torch.equal(off, plain)
    assert not torch.equal(merged, plain)
    assert "tomesd-ext: token merging skipped" not in comfy_server.read_log()


@pytest.mark.skipif(not os.environ.get("TOMESD_EXT_WORKFLOW_GRID"), reason="set TOMESD_EXT_WORKFLOW_GRID=out.png to render the README grid")
def test_render_workflow_grid(sd15_server):
    comfy_server = sd15_server
    """Rows: shipped workflows; columns: ToMe off (ratio 0) and the workflow's own ratio. Images
    come from ComfyUI itself, on the random SD1.5 checkpoint (noise-like by construction)."""
    from PIL import Image, ImageDraw

    size, steps = int(os.environ.get("TOMESD_EXT_GRID_SIZE", "256")), int(os.environ.get("TOMESD_EXT_GRID_STEPS", "8"))
    rows = []
    for name in SD_API_FILES:
        prompt = _small(load_workflow(name), "grid/" + name.split(".")[0])
        tome = next((k for k, v in prompt.items() if v["class_type"] in nodes.NODE_DEFINITIONS
                     and "ratio" in v["inputs"]), None)
        if tome is None:  # the grid shows the workflows whose node has a ratio (not VidToMe's)
            continue
        ratio = prompt[tome]["inputs"]["ratio"]
        row = []
        for r in (0.0, ratio):
            p = json.loads(json.dumps(prompt))
            p[tome]["inputs"]["ratio"] = r
            for node in p.values():
                if node["class_type"] == "EmptyLatentImage":
                    node["inputs"]["width"] = node["inputs"]["height"] = size
                if "steps" in node["inputs"]:
                    node["inputs"]["steps"] = steps
            (path,) = comfy_server.output_files(comfy_server.run_prompt(p))
            row.append((f"{name.split('.')[0]}  ratio {r}", Image.open(path).convert("RGB")))
        rows.append(row)
    pad = 24
    grid = Image.new("RGB", (2 * size, len(rows) * (size + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for i, row in enumerate(rows):
        for j, (label, img) in enumerate(row):
            grid.paste(img, (j * size, i * (size + pad) + pad))
            draw.text((j * size + 4, i * (size + pad) + 6), label, fill="black")
    out = os.environ["TOMESD_EXT_WORKFLOW_GRID"]
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    grid.save(out)
    assert os.path.getsize(out) > 0


@pytest.mark.skipif(not os.environ.get("TOMESD_EXT_WORKFLOW_GRID"), reason="set TOMESD_EXT_WORKFLOW_GRID=out.png to render the README grid")
def test_render_vid2vid_strip(sd15_server):
    """The video workflow as ComfyUI runs it, beside the README grid (comfyui_vid2vid.png):
    rows = input frames, nothing merged (chunk 1, ratios 0), VidToMe defaults; 4 frames each."""
    import av
    from PIL import Image, ImageDraw

    from tomesd_ext.video.io import write_mp4
    from tomesd_ext.video.synthetic import moving_shapes

    comfy_server = sd15_server
    size, steps = int(os.environ.get("TOMESD_EXT_GRID_SIZE", "256")), int(os.environ.get("TOMESD_EXT_GRID_STEPS", "8"))
    clip = moving_shapes(n_frames=8, size=size, seed=1)
    write_mp4(clip, os.path.join(comfy_server.base, "input", "tomesd_ext_strip.mp4"), fps=8)
    base = _small(load_workflow("sd15_vid2vid_vidtome.api.json"), "grid/vid2vid")
    vid = next(k for k, v in base.items() if v["class_type"] == "TomesdExtVidToMe")
    rows = [("input (synthetic moving shapes)", [Image.fromarray(f) for f in clip[:4]])]
    for label, settings in (("nothing merged (chunk 1, ratios 0)", {"chunk_size": 1, "local_ratio": 0.0, "global_ratio": 0.0}),
                            ("VidToMe defaults", {})):
        prompt = json.loads(json.dumps(base))
        prompt[vid]["inputs"].update(settings)
        for node in prompt.values():
            if node["class_type"] == "LoadVideo":
                node["inputs"]["file"] = "tomesd_ext_strip.mp4"
            if node["class_type"] == "ImageScale":
                node["inputs"]["width"] = node["inputs"]["height"] = size
            if "steps" in node["inputs"]:
                node["inputs"]["steps"] = steps
        (path,) = comfy_server.output_files(comfy_server.run_prompt(prompt))
        with av.open(path) as container:
            frames = [f.to_image().convert("RGB") for f in container.decode(video=0)]
        rows.append((label, frames[:4]))
    pad = 24
    strip = Image.new("RGB", (4 * size, len(rows) * (size + pad)), "white")
    draw = ImageDraw.Draw(strip)
    for i, (label, frames) in enumerate(rows):
        draw.text((4, i * (size + pad) + 6), label, fill="black")
        for j, img in enumerate(frames):
            strip.paste(img.resize((size, size)), (j * size, i * (size + pad) + pad))
    out = os.path.join(os.path.dirname(os.path.abspath(os.environ["TOMESD_EXT_WORKFLOW_GRID"])), "comfyui_vid2vid.png")
    strip.save(out)
    assert os.path.getsize(out) > 0

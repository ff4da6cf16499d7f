"""The shipped Wan 2.1 workflows in the real ComfyUI, on seeded random-weight files under the
names they expect (wan_files.py: umT5-XXL at full size in fp8 with zero blocks, written sparse, the Wan model at the 1.3B width
with 2 blocks, a narrow Wan VAE), in one server (the text encoder loads once), at a test size:
96x64, 9 frames (3 latent frames of 6x4 tokens), 2 steps.

- text-to-video (example_workflows/wan21_t2v_tome.json, API copy
  tests/comfy/workflows/wan21_t2v_tome.api.json): an animated WEBP;
- video-to-video (wan21_vid2vid_tome: Load Video -> VAE Encode -> KSampler denoise 0.6 -> VAE
  Decode -> Save Video) on a synthetic 10-frame clip the test writes: Wan's VAE keeps 4k+1
  frames, so the mp4 holds 9, at the clip's fps.

Each: ratio 0 equals the graph without our node on the sampled latents, the shipped ratio 0.5
differs. The text encoding dominates (ComfyUI pads every prompt to 512 umT5 tokens), so both
tests encode the same two texts (the text-to-video workflow's) and the server does it once; it
peaks at about 12 GB."""

import os

import pytest

from comfy_env import ComfyServer, as_advanced_tome, comfyui_path, load_workflow, tome_key
from wan_files import wan_files

pytestmark = pytest.mark.comfyui

WIDTH, HEIGHT, LENGTH, STEPS = 96, 64, 9, 2
CLIP_NAME, CLIP_FRAMES, CLIP_FPS = "tomesd_ext_wan_test_clip.mp4", 10, 16


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


def _prompt(name, tome, prefix):
    """API copy ``name`` at test size; tome: the ToMe node's changed inputs, or None for no node.
    A SaveLatent node keeps the sampler's latents."""
    prompt = load_workflow(f"{name}.api.json")
    node = tome_key(prompt)
    sampler = next(k for k, v in prompt.items() if v["class_type"] == "KSampler")
    for v in prompt.values():
        if v["class_type"] in ("EmptyHunyuanLatentVideo", "ImageScale"):
            v["inputs"].update(width=WIDTH, height=HEIGHT)
        if v["class_type"] == "EmptyHunyuanLatentVideo":
            v["inputs"]["length"] = LENGTH
        if v["class_type"] == "LoadVideo":
            v["inputs"]["file"] = CLIP_NAME
        if v["class_type"] in ("SaveAnimatedWEBP", "SaveVideo"):
            v["inputs"]["filename_prefix"] = prefix
    prompt[sampler]["inputs"]["steps"] = STEPS
    # the text-to-video workflow's two texts in every test: ComfyUI caches a node's output by its
    # inputs, so the server encodes them once (the umT5-XXL encoding is most of the time)
    t2v = load_workflow("wan21_t2v_tome.api.json")
    t2v_sampler = next(v for v in t2v.values() if v["class_type"] == "KSampler")
    for side in ("positive", "negative"):
        text = t2v[t2v_sampler["inputs"][side][0]]["inputs"]["text"]
        prompt[prompt[sampler]["inputs"][side][0]]["inputs"]["text"] = text
    if tome is None:
        prompt[sampler]["inputs"]["model"] = prompt[node]["inputs"]["model"]
        del prompt[node]
    else:
        as_advanced_tome(prompt[node], **tome)
    prompt["save_latent"] = {"class_type": "SaveLatent", "inputs": {"samples": [sampler, 0], "filename_prefix": prefix}}
    return prompt


def _merged_off_plain(server, name, check_output):
    """The sampled latents of workflow ``name`` at the shipped ratio, at ratio 0 and without the
    node; check_output(path) checks each run's saved video."""
    from safetensors.torch import load_file

    def run(tome, prefix):
        entry = server.run_prompt(_prompt(name, tome, prefix), timeout=1200)
        (video,) = server.output_files(entry)
        check_output(video)
        (saved,) = [f for out in entry["outputs"].values() for f in out.get("latents", [])]
        path = os.path.join(server.base, "output", saved.get("subfolder", ""), saved["filename"])
        return load_file(path)["latent_tensor"]

    merged = run({"min_tokens": 0}, f"tests/{name}_merged")  # the shipped ratio 0.5, st 2
    off = run({"min_tokens": 0, "ratio": 0.0}, f"tests/{name}_off")
    plain = run(None, f"tests/{name}_plain")
    assert merged.shape == plain.shape == (1, 16, 3, HEIGHT // 8, WIDTH // 8)
    assert plain.isfinite().all() and merged.isfinite().all()
    assert (off == plain).all()
    change = ((merged - plain).norm() / plain.norm()).item()
    print(f"WAN {name} latents: merged vs no node relative difference {change:.4f}")
    assert change > 1e-3
    log = server.read_log()
    assert "are not merged" not in log and "below min_tokens" not in log


def test_wan_workflow_runs_merges_and_ratio_zero_equals_no_node(wan_server):
    from PIL import Image

    def check(webp):
        with Image.open(webp) as img:
            assert (img.n_frames, img.size) == (LENGTH, (WIDTH, HEIGHT))

    _merged_off_plain(wan_server, "wan21_t2v_tome", check)


def test_wan_vid2vid_workflow_runs_merges_and_ratio_zero_equals_no_node(wan_server):
    import av

    from tomesd_ext.video.io import write_mp4
    from tomesd_ext.video.synthetic import moving_shapes

    write_mp4(moving_shapes(n_frames=CLIP_FRAMES, size=WIDTH, seed=0), os.path.join(wan_server.base, "input", CLIP_NAME),
              fps=CLIP_FPS)

    def check(mp4):
        assert mp4.endswith(".mp4")
        with av.open(mp4) as container:
            stream = container.streams.video[0]
            frames = list(container.decode(stream))
            assert float(stream.average_rate) == CLIP_FPS
        # Wan's VAE encodes 1 + 4k frames (the 10th is dropped) and center-cropped 96x96 -> 96x64
        assert (len(frames), frames[0].width, frames[0].height) == (LENGTH, WIDTH, HEIGHT)

    _merged_off_plain(wan_server, "wan21_vid2vid_tome", check)


def test_wan_vid2vid_workflow_is_core_nodes_sdedit_with_our_node():
    """wan21_vid2vid_tome (no server): ComfyUI's core nodes and our simple ToMe node only, wired
    Load Video -> Get Video Components -> Image Scale -> VAE Encode -> KSampler (denoise < 1) ->
    VAE Decode -> Create Video (the input's fps) -> Save Video, the model through our node, the
    Wan files of the text-to-video workflow; the UI file's Note names every file."""
    api = load_workflow("wan21_vid2vid_tome.api.json")
    by_type = {}
    for key, node in api.items():
        by_type.setdefault(node["class_type"], []).append((key, node["inputs"]))
    assert set(by_type) == {"UNETLoader", "CLIPLoader", "VAELoader", "TomesdExtTokenMergingSimple", "CLIPTextEncode",
                            "LoadVideo", "GetVideoComponents", "ImageScale", "VAEEncode", "KSampler", "VAEDecode",
                            "CreateVideo", "SaveVideo"}
    one = {t: nodes[0] for t, nodes in by_type.items() if len(nodes) == 1}

    def feeds(src, dst, name, index=0):
        return one[dst][1][name] == [one[src][0], index]

    assert feeds("LoadVideo", "GetVideoComponents", "video")
    assert feeds("GetVideoComponents", "ImageScale", "image")
    assert feeds("ImageScale", "VAEEncode", "pixels") and feeds("VAELoader", "VAEEncode", "vae")
    assert feeds("VAEEncode", "KSampler", "latent_image")
    assert feeds("UNETLoader", "TomesdExtTokenMergingSimple", "model") and feeds("TomesdExtTokenMergingSimple", "KSampler", "model")
    assert feeds("KSampler", "VAEDecode", "samples") and feeds("VAELoader", "VAEDecode", "vae")
    assert feeds("VAEDecode", "CreateVideo", "images") and feeds("GetVideoComponents", "CreateVideo", "fps", 2)
    assert feeds("CreateVideo", "SaveVideo", "video")
    assert 0 < one["KSampler"][1]["denoise"] < 1
    t2v = {v["class_type"]: v["inputs"] for v in load_workflow("wan21_t2v_tome.api.json").values()}
    files = [one[t][1][k] for t, k in (("UNETLoader", "unet_name"), ("CLIPLoader", "clip_name"), ("VAELoader", "vae_name"))]
    assert files == [t2v["UNETLoader"]["unet_name"], t2v["CLIPLoader"]["clip_name"], t2v["VAELoader"]["vae_name"]]
    assert one["CLIPLoader"][1]["type"] == "wan"
    (note,) = [n for n in load_workflow("wan21_vid2vid_tome.json")["nodes"] if n["type"] == "Note"]
    for name in files + [one["LoadVideo"][1]["file"]]:
        assert name in note["widgets_values"][0], name

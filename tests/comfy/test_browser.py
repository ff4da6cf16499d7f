"""The shipped example workflows as a user meets them: the real ComfyUI (server on loopback, the
pack in custom_nodes) in headless Chromium, once with the frontend the ComfyUI under test pins
and once with a newer comfyui-frontend-package (COMFYUI_NEWER_FRONTEND, served with
--front-end-root; `make comfyui` installs the pinned version). Each workflow is opened from the
template browser; the app must show no error, queue exactly the values of the workflow's API
copy, show every node whole and apart from the others; a fresh node's merge seed must not get
the frontend's randomising control; one workflow is queued and must run to the end."""

import os
import time

import pytest

from comfy_browser import (
    PACK,
    App,
    cramped,
    frontend_version,
    newer_frontend_missing,
    newer_frontend_root,
    overlaps,
    workflow_names,
)
from comfy_env import TOME_SIMPLE, ComfyServer, load_workflow, require_node_pack, workflow_packs
from conftest import _cached

import nodes

pytestmark = [pytest.mark.comfyui, pytest.mark.browser]

SHIPPED_SD15 = "v1-5-pruned-emaonly-fp16.safetensors"  # the checkpoint name the SD 1.5 workflows use
SHIPPED_VIDEO = "tomesd_ext_input.mp4"  # the input video the vid2vid workflow names
OUR_NODES = tuple(nodes.NODE_DEFINITIONS)
# the loader inputs of the shipped workflows that name a model file, and the models/ folder it is in
MODEL_INPUTS = {"ckpt_name": "checkpoints", "unet_name": "diffusion_models", "clip_name": "text_encoders",
                "model_name": "animatediff_models",  # ComfyUI-AnimateDiff-Evolved's Load AnimateDiff Model
                "clip_name1": "text_encoders", "clip_name2": "text_encoders", "vae_name": "vae"}


def _provide_model_files(server, checkpoint, tmp_dir):
    """Every model and input file a shipped workflow names, present under that name, as a user
    who opens it has them (newer frontends flag a missing file): the SD 1.5 checkpoint as the
    one-level random checkpoint (the queued workflow runs on it), the input video as a short
    synthetic clip, every other model an empty file that is listed, never loaded."""
    from tomesd_ext.video.io import write_mp4
    from tomesd_ext.video.synthetic import moving_shapes

    server.add_checkpoint(SHIPPED_SD15, checkpoint)
    write_mp4(moving_shapes(n_frames=4, size=64, seed=0), os.path.join(server.base, "input", SHIPPED_VIDEO), fps=8)
    empty = os.path.join(tmp_dir, "empty.safetensors")
    open(empty, "wb").close()
    for name in workflow_names():
        for node in load_workflow(f"{name}.api.json").values():
            for key, value in node["inputs"].items():
                if key in MODEL_INPUTS and value != SHIPPED_SD15:
                    server.add_model(MODEL_INPUTS[key], value, empty)


@pytest.fixture(scope="module", params=["pinned", "newer"], ids=["pinned-frontend", "newer-frontend"])
def app(request, tmp_path_factory):
    """The app in Chromium, on a server of its own (its models/ holds the shipped workflows' file
    names, which no other test may see): "pinned" serves the frontend installed with the ComfyUI
    under test, "newer" the one in COMFYUI_NEWER_FRONTEND."""
    from playwright.sync_api import sync_playwright

    root = None
    if request.param == "newer":
        root = newer_frontend_root()
        if root is None:
            if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
                pytest.fail(f"CI: the newer frontend is missing: {newer_frontend_missing()}")
            pytest.skip(newer_frontend_missing())
    # with the node packs shipped workflows need besides ours (AnimateDiff-Evolved): all open in one app
    packs = sorted({p for name in workflow_names() for p in workflow_packs(name)})
    server = ComfyServer(str(tmp_path_factory.mktemp(f"comfyui_{request.param}_frontend")), front_end_root=root,
                         packs=[require_node_pack(p) for p in packs])
    os.makedirs(os.path.join(server.base, "models", "animatediff_models"), exist_ok=True)
    try:
        server.wait_ready(timeout=600)
        _provide_model_files(server, _cached("sd15-1level"), str(tmp_path_factory.mktemp("model_files")))
        with sync_playwright() as pw:
            opened = App(server, pw)
            opened.expected_version = frontend_version(root)
            try:
                yield opened
            finally:
                opened.close()
    finally:
        server.stop()


def test_the_app_is_the_frontend_under_test(app):
    assert app.frontend_version() == app.expected_version


def _inputs(prompt):
    return {k: (v["class_type"], v["inputs"]) for k, v in prompt.items()}


def test_template_browser_lists_the_examples_with_thumbnails(app):
    listed = app.server.get("/workflow_templates")
    assert {pack: sorted(names) for pack, names in listed.items()} == {PACK: workflow_names()}
    for name in workflow_names():
        status = app.evaluate(
            "async (url) => { const r = await fetch(url); return [r.status, r.headers.get('content-type')]; }",
            f"/api/workflow_templates/{PACK}/{name}.jpg")
        assert status == [200, "image/jpeg"], name


@pytest.mark.parametrize("name", workflow_names())
def test_example_opens_as_shipped(app, name):
    app.open_template(name)
    assert app.shown_problems() == []
    assert app.page_errors == []
    assert _inputs(app.queued_prompt()) == _inputs(load_workflow(f"{name}.api.json"))
    boxes = app.node_boxes()
    assert overlaps(boxes) == []
    assert cramped(boxes) == []
    assert any(b["type"] == "Note" for b in boxes)
    widgets = app.evaluate("""() => window.app.graph.nodes.filter(n => %r.includes(n.type))
        .map(n => [n.type, n.widgets.map(w => w.name)])""" % (list(OUR_NODES),))
    assert widgets  # each of our nodes shows exactly its declared widgets (no control_after_generate)
    for node_type, names in widgets:
        declared = nodes.NODE_DEFINITIONS[node_type].INPUT_TYPES()["required"]
        assert names == [name for name in declared if name != "model"], node_type


def test_fresh_node_seed_has_no_randomising_control(app):
    """A node added by hand: our seeds get no control widget; KSampler's still does (so the check
    sees the widget where the frontend adds it)."""
    names = app.evaluate("""(types) => Object.fromEntries(types.map(t => {
        const n = LiteGraph.createNode(t);
        return [t, n.widgets.map(w => [w.name, w.value])];
    }))""", list(OUR_NODES) + ["KSampler"])
    for node in OUR_NODES:
        widgets = dict(names[node])
        assert "control_after_generate" not in widgets, node
        if node != TOME_SIMPLE:  # the simple node shows no seed (it runs with the fixed seed 0)
            assert widgets["seed"] == 0, node
    assert dict(names["KSampler"])["control_after_generate"] == "randomize"


def test_queue_an_example_to_the_end(app):
    """sd15_txt2img_tome from the template browser, made small in its widgets as a user would
    (64 px, 2 steps), queued with the app's Run; its simple ToMe node goes out with its three
    values (at 64 px its auto-skip leaves the 8x8 latent unmerged: the server tests merge)."""
    app.open_template("sd15_txt2img_tome")
    app.evaluate("""() => {
        const set = (type, name, value) => window.app.graph.nodes.filter(n => n.type === type)
            .forEach(n => { n.widgets.find(w => w.name === name).value = value; });
        set('EmptyLatentImage', 'width', 64); set('EmptyLatentImage', 'height', 64);
        set('KSampler', 'steps', 2);
        set('SaveImage', 'filename_prefix', 'tests/browser');
    }""")
    before = set(app.server.get("/history"))
    app.evaluate("() => window.app.queuePrompt(0, 1)")
    end = time.time() + 600  # a deadline for a hung run, not a timing: a loaded machine is slow
    while time.time() < end:
        new = {k: v for k, v in app.server.get("/history").items() if k not in before}
        if new and all(v.get("status", {}).get("completed") is not None for v in new.values()):
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"the queued workflow did not finish: {app.server.read_log()[-3000:]}")
    (entry,) = new.values()
    assert entry["status"]["status_str"] == "success", entry["status"]
    tome = entry["prompt"][2]["2"]
    assert tome["class_type"] == TOME_SIMPLE
    assert {k: v for k, v in tome["inputs"].items() if k != "model"} == {"ratio": 0.5, "start_percent": 0.0,
                                                                          "end_percent": 1.0}
    (image,) = app.server.output_files(entry)
    assert image.endswith(".png")
    assert app.shown_problems() == [] and app.page_errors == []

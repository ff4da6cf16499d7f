"""The shipped example workflows as a user meets them: the real ComfyUI (server on loopback, the
pack in custom_nodes) in headless Chromium. Each workflow is opened from the template browser;
the app must show no error, queue exactly the values of the workflow's API copy, show every node
whole and apart from the others; a fresh node's merge seed must not get the frontend's
randomising control; one workflow is queued and must run to the end."""

import os
import time

import pytest

from comfy_browser import PACK, App, cramped, overlaps, workflow_names
from comfy_env import ComfyServer, load_workflow, require_node_pack, workflow_packs

pytestmark = [pytest.mark.comfyui, pytest.mark.browser]

SHIPPED_SD15 = "v1-5-pruned-emaonly-fp16.safetensors"  # the checkpoint name the SD 1.5 workflows use
OUR_NODES = ("TomesdExtTokenMerging", "TomesdExtImportanceMerging", "TomesdExtVidToMe")


@pytest.fixture(scope="module")
def playwright():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        yield pw


@pytest.fixture(scope="module")
def app(sd15_server, sd15_checkpoint, playwright):
    # the random test checkpoint under the shipped name, so a shipped workflow can be queued as is
    sd15_server.add_checkpoint(SHIPPED_SD15, sd15_checkpoint)
    opened = App(sd15_server, playwright)
    try:
        yield opened
    finally:
        opened.close()


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


@pytest.fixture(scope="module")
def pack_app(tmp_path_factory, sd15_checkpoint, playwright):
    """The app on a second server with the node packs the other workflows need (AnimateDiff-Evolved)
    and their files under the shipped names."""
    from animatediff_files import MOTION_MODULE_NAME, cached_motion_module

    packs = sorted({p for name in workflow_names() for p in workflow_packs(name)})
    server = ComfyServer(str(tmp_path_factory.mktemp("comfyui_packs")), packs=[require_node_pack(p) for p in packs])
    try:
        server.add_checkpoint(SHIPPED_SD15, sd15_checkpoint)
        os.makedirs(os.path.join(server.base, "models", "animatediff_models"), exist_ok=True)
        server.add_model("animatediff_models", MOTION_MODULE_NAME, cached_motion_module())
        server.wait_ready()
        opened = App(server, playwright)
        try:
            yield opened
        finally:
            opened.close()
    finally:
        server.stop()


@pytest.mark.parametrize("name", [n for n in workflow_names() if not workflow_packs(n)])
def test_example_opens_as_shipped(app, name):
    _opens_as_shipped(app, name)


@pytest.mark.parametrize("name", [n for n in workflow_names() if workflow_packs(n)])
def test_example_with_other_node_packs_opens_as_shipped(pack_app, name):
    _opens_as_shipped(pack_app, name)


def _opens_as_shipped(app, name):
    app.open_template(name)
    assert app.shown_problems() == []
    assert app.page_errors == []
    assert _inputs(app.queued_prompt()) == _inputs(load_workflow(f"{name}.api.json"))
    boxes = app.node_boxes()
    assert overlaps(boxes) == []
    assert cramped(boxes) == []
    assert any(b["type"] == "Note" for b in boxes)
    controls = app.evaluate("""() => window.app.graph.nodes.filter(n => %r.includes(n.type))
        .map(n => n.widgets.map(w => w.name))""" % (list(OUR_NODES),))
    assert controls and all("seed" in names and "control_after_generate" not in names for names in controls)


def test_fresh_node_seed_has_no_randomising_control(app):
    """A node added by hand: our seeds get no control widget; KSampler's still does (so the check
    sees the widget where the frontend adds it)."""
    names = app.evaluate("""(types) => Object.fromEntries(types.map(t => {
        const n = LiteGraph.createNode(t);
        return [t, n.widgets.map(w => [w.name, w.value])];
    }))""", list(OUR_NODES) + ["KSampler"])
    for node in OUR_NODES:
        widgets = dict(names[node])
        assert "control_after_generate" not in widgets and widgets["seed"] == 0, node
    assert dict(names["KSampler"])["control_after_generate"] == "randomize"


def test_queue_an_example_to_the_end(app):
    """sd15_txt2img_tome from the template browser, made small in its widgets as a user would
    (64 px, 2 steps, min_tokens 0 so the 8x8 latent merges), queued with the app's Run."""
    app.open_template("sd15_txt2img_tome")
    app.evaluate("""() => {
        const set = (type, name, value) => window.app.graph.nodes.filter(n => n.type === type)
            .forEach(n => { n.widgets.find(w => w.name === name).value = value; });
        set('EmptyLatentImage', 'width', 64); set('EmptyLatentImage', 'height', 64);
        set('KSampler', 'steps', 2); set('TomesdExtTokenMerging', 'min_tokens', 0);
        set('SaveImage', 'filename_prefix', 'tests/browser');
    }""")
    before = set(app.server.get("/history"))
    app.evaluate("() => window.app.queuePrompt(0, 1)")
    end = time.time() + 120
    while time.time() < end:
        new = {k: v for k, v in app.server.get("/history").items() if k not in before}
        if new and all(v.get("status", {}).get("completed") is not None for v in new.values()):
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"the queued workflow did not finish: {app.server.read_log()[-3000:]}")
    (entry,) = new.values()
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert entry["prompt"][2]["2"]["inputs"]["seed"] == 0 and entry["prompt"][2]["2"]["class_type"] == "TomesdExtTokenMerging"
    (image,) = app.server.output_files(entry)
    assert image.endswith(".png")
    assert app.shown_problems() == [] and app.page_errors == []

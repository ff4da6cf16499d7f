"""The ComfyUI frontend in headless Chromium (Debian's package `chromium`, driven by playwright),
against a ComfyServer on loopback: open a workflow as a user does (the template browser), read
what the app shows (error toasts and dialogs), what it would queue (``app.graphToPrompt()``) and
where its nodes are (their boxes at the frontend's real node sizes).

Used by test_browser.py, and run as a script to (re)write the shipped example workflows:

    COMFYUI_PATH=/path/to/ComfyUI python tests/comfy/comfy_browser.py

builds each example_workflows/<name>.json in the frontend from its API copy
tests/comfy/workflows/<name>.api.json (nodes laid out in columns by their depth in the graph, at
the sizes the frontend gives them; a Note with the files the workflow needs), and renders the
thumbnail example_workflows/<name>.jpg and the screenshot docs/img/comfyui_<name>.png of the
opened workflow.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # comfy_env, when run as a script
from comfy_env import API_COPIES, EXAMPLES, REPO, ComfyServer, node_pack, workflow_packs  # noqa: E402

PACK = "tomesd-ext"  # the pack's folder name in custom_nodes (ComfyServer links it so)
CHROMIUM = os.environ.get("TOMESD_EXT_CHROMIUM", "/usr/bin/chromium")
VIEWPORT = {"width": 1600, "height": 900}

# What each workflow needs besides its nodes: the Note shown in the graph.
NOTES = {
    "sd15_txt2img_tome": "Needs an SD 1.5 checkpoint in models/checkpoints (the graph names "
                         "v1-5-pruned-emaonly-fp16.safetensors; pick yours in Load Checkpoint).",
    "sd15_txt2img_importance": "Needs an SD 1.5 checkpoint in models/checkpoints (the graph names "
                               "v1-5-pruned-emaonly-fp16.safetensors). Importance merging needs cfg > 1.",
    "sdxl_txt2img_tome": "Needs an SDXL checkpoint in models/checkpoints (the graph names "
                         "sd_xl_base_1.0.safetensors; pick yours in Load Checkpoint).",
    "flux1_txt2img_tome": "Flux.1-dev: flux1-dev.safetensors in models/diffusion_models (Load Diffusion Model); "
                          "clip_l.safetensors and t5xxl_fp16.safetensors in models/text_encoders (DualCLIPLoader, "
                          "type flux); ae.safetensors in models/vae. cfg stays 1 (FluxGuidance sets the distilled "
                          "guidance). ToMe sits between the model loader and the sampler.",
    "sd35_txt2img_tome": "SD 3.5: sd3.5_large.safetensors (or sd3.5_medium.safetensors) in models/checkpoints; "
                         "clip_l.safetensors and clip_g.safetensors in models/text_encoders (DualCLIPLoader, type "
                         "sd3: no T5; for T5 use TripleCLIPLoader with t5xxl_fp16.safetensors). ToMe sits between "
                         "the checkpoint loader and the sampler.",
    "sd15_txt2img_tome_easycache_compile": "Needs an SD 1.5 checkpoint in models/checkpoints "
                                           "(v1-5-pruned-emaonly-fp16.safetensors). The first run compiles the UNet "
                                           "(minutes). ToMe merges the tokens of every step that runs; EasyCache skips "
                                           "steps (see its console line).",
    "sd15_vid2vid_vidtome": "Needs an SD 1.5 checkpoint in models/checkpoints and an input video "
                            "tomesd_ext_input.mp4 in ComfyUI/input (or choose/upload one in Load Video). "
                            "Keep it short: every frame goes through the sampler in one batch.",
    "sd15_animatediff_tome": "Needs the ComfyUI-AnimateDiff-Evolved node pack, an SD 1.5 checkpoint in models/checkpoints "
                             "(v1-5-pruned-emaonly-fp16.safetensors) and the motion module v3_sd15_mm.ckpt in "
                             "models/animatediff_models. 24 frames (batch_size), run in 16-frame context windows. "
                             "ToMe sits after Use Evolved Sampling (before it: the same result).",
    "wan21_t2v_tome": "Wan 2.1 text-to-video 1.3B. Needs wan2.1_t2v_1.3B_fp16.safetensors in "
                      "models/diffusion_models, umt5_xxl_fp8_e4m3fn_scaled.safetensors in models/text_encoders "
                      "(Load CLIP, type wan) and wan_2.1_vae.safetensors in models/vae. 832x480, 33 frames "
                      "(9 latent frames); ToMe merges video tokens across st=2 latent frames, never the text.",
    "wan21_vid2vid_tome": "Wan 2.1 1.3B video-to-video (SDEdit: denoise 0.6). Needs wan2.1_t2v_1.3B_fp16.safetensors "
                          "in models/diffusion_models, umt5_xxl_fp8_e4m3fn_scaled.safetensors in models/text_encoders "
                          "(Load CLIP, type wan), wan_2.1_vae.safetensors in models/vae and a short clip "
                          "tomesd_ext_input.mp4 in ComfyUI/input: 4k+1 frames (e.g. 33), sampled in one batch.",
}


# The browser test runs on two frontends: the one the ComfyUI under test pins (its requirements.txt,
# installed in the environment) and a newer comfyui-frontend-package served with --front-end-root
# from COMFYUI_NEWER_FRONTEND (its static folder; `make comfyui` installs the pinned newest version
# into the cache and `make test` sets it).
NEWER_FRONTEND_ENV = "COMFYUI_NEWER_FRONTEND"


def newer_frontend_root() -> str | None:
    path = os.environ.get(NEWER_FRONTEND_ENV)
    return path if path and os.path.isfile(os.path.join(path, "index.html")) else None


def newer_frontend_missing() -> str:
    path = os.environ.get(NEWER_FRONTEND_ENV)
    what = f"{NEWER_FRONTEND_ENV}={path} has no index.html" if path else f"{NEWER_FRONTEND_ENV} is not set"
    return (f"{what}: point it at the static folder of a newer comfyui-frontend-package (`make comfyui` "
            "installs the pinned one into the cache; docs/development.md)")


def frontend_version(root=None) -> str:
    """The version of the frontend that a server serves: the comfyui-frontend-package installed
    in this environment (root None), else the one whose static folder ``root`` is (its dist-info
    lies beside the package folder)."""
    if root is None:
        from importlib.metadata import version

        return version("comfyui-frontend-package")
    site = os.path.dirname(os.path.dirname(os.path.abspath(root)))
    (info,) = [d for d in os.listdir(site) if d.startswith("comfyui_frontend_package-") and d.endswith(".dist-info")]
    return info[len("comfyui_frontend_package-"): -len(".dist-info")]


def workflow_names():
    return sorted(f[: -len(".api.json")] for f in os.listdir(API_COPIES) if f.endswith(".api.json"))


def chromium_missing() -> str | None:
    """Why the browser test cannot run here (None when it can)."""
    if not os.access(CHROMIUM, os.X_OK):
        return (f"no Chromium at {CHROMIUM}: install Debian's package (`apt-get install chromium`; "
                "`make test` does it as root) or set TOMESD_EXT_CHROMIUM")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[dev]')"
    return None


NODE_BOXES = """() => window.app.graph.nodes.map(n => ({
  id: n.id, type: n.type, title: n.title,
  box: Array.from(n.boundingRect),
  size: Array.from(n.size), needed: Array.from(n.computeSize()),
}))"""

# The width a node needs to show its title and its one-line widgets (label and value) whole, in
# the frontend's node fonts; longer texts (prompts) are left to the frontend's own sizing.
NEEDED_WIDTH = """const neededWidth = (() => {
  const ctx = document.createElement('canvas').getContext('2d');
  const text = (s, size) => { ctx.font = size + 'px ' + (LiteGraph.NODE_FONT || 'Arial'); return ctx.measureText(s).width; };
  const title = LiteGraph.NODE_TITLE_HEIGHT, small = LiteGraph.NODE_SUBTEXT_SIZE || 12;
  return n => {
    const widgets = (n.widgets || []).filter(w => ['number', 'string', 'boolean'].includes(typeof w.value)
      && String(w.value).length <= 48 && !String(w.value).includes('\\n'));
    return Math.ceil(Math.max(text(n.title || '', LiteGraph.NODE_TEXT_SIZE || 14) + 2 * title,
      ...widgets.map(w => text(w.label || w.name, small) + text(String(w.value), small) + 3 * title)));
  };
})();"""

# Lay the nodes out in columns by depth (longest path from a source; a source sits just before
# its first consumer), in id order within a column, each node as wide as its title and one-line
# widgets need and as wide as the widest node of its column (so every output sits on the
# column's right edge and no link runs behind a wider neighbour), at the heights the frontend
# gave them; a Note goes below the first column. Then set the KSampler seeds to "fixed" (same
# image every run).
LAYOUT = """([note, gap]) => {
  """ + NEEDED_WIDTH + """
  const g = window.app.graph, title = LiteGraph.NODE_TITLE_HEIGHT;
  const nodes = g.nodes.slice().sort((a, b) => a.id - b.id);
  for (const n of nodes) if (n.title === n.type) n.title = LiteGraph.registered_node_types[n.type].title || n.title;
  const depth = new Map();
  const inputsOf = n => (n.inputs || []).filter(i => i.link != null).map(i => g.links[i.link].origin_id);
  const d = n => {
    if (!depth.has(n.id)) depth.set(n.id, Math.max(-1, ...inputsOf(n).map(id => d(g.getNodeById(id)))) + 1);
    return depth.get(n.id);
  };
  nodes.forEach(d);
  for (const n of nodes) {
    if (inputsOf(n).length) continue;
    const consumers = nodes.filter(m => inputsOf(m).includes(n.id)).map(m => depth.get(m.id));
    if (consumers.length) depth.set(n.id, Math.min(...consumers) - 1);
  }
  const columns = [];
  for (const n of nodes) (columns[depth.get(n.id)] ||= []).push(n);
  let x = 0;
  columns.forEach((col, c) => {
    if (c === 0 && note) {
      const w = LiteGraph.createNode('Note');
      w.title = 'Note: what this workflow needs';
      w.widgets[0].value = note;
      g.add(w);
      w.size = [0, 140];
      col.push(w);
    }
    const width = Math.max(...col.map(n => Math.max(n.size[0], neededWidth(n))));
    let y = title;
    for (const n of col) { n.size[0] = width; n.pos = [x, y]; y += n.size[1] + title + gap; }
    x += width + gap;
  });
  for (const n of nodes) for (const w of n.widgets || [])
    if (w.name === 'control_after_generate') w.value = 'fixed';
  g.setDirtyCanvas(true, true);
  return true;
}"""

# Fit the graph into the part of the canvas that the app's bars leave free (top, left), as
# "fit view" does, for the screenshots.
FIT_VIEW = """([top, left]) => {
  const c = window.app.canvas, W = c.canvas.width / devicePixelRatio, H = c.canvas.height / devicePixelRatio;
  const xs = [], ys = [];
  for (const n of window.app.graph.nodes) { const r = n.boundingRect; xs.push(r[0], r[0] + r[2]); ys.push(r[1], r[1] + r[3]); }
  const pad = 20, x0 = Math.min(...xs), y0 = Math.min(...ys), w = Math.max(...xs) - x0, h = Math.max(...ys) - y0;
  const scale = Math.min((W - left - 2 * pad) / w, (H - top - 2 * pad) / h, 1.2);
  c.ds.scale = scale;
  c.ds.offset = [(left + pad + (W - left - 2 * pad - w * scale) / 2) / scale - x0,
                 (top + pad + (H - top - 2 * pad - h * scale) / 2) / scale - y0];
  c.setDirty(true, true);
  return scale;
}"""


class App:
    """One Chromium page with the ComfyUI app of ``server`` loaded."""

    def __init__(self, server, playwright, viewport=VIEWPORT):
        self.server = server
        self.viewport = viewport
        # --disable-dev-shm-usage: the renderer's shared memory in /tmp, not a container's small /dev/shm
        self.browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                                  args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        self.page = None
        self.page_errors = []
        self.console_errors = []
        # a first visit opens the template browser by itself; a user who has been here has it closed
        # (and the minimap, which would cover a corner of the screenshots, is off); a new page
        # restores no workflow of an earlier one
        for setting, value in (("Comfy.TutorialCompleted", True), ("Comfy.Minimap.Visible", False),
                               ("Comfy.Workflow.Persist", False)):
            status, _ = server.post(f"/settings/{setting}", value)
            assert status == 200, (setting, status)
        self.new_page()

    def new_page(self):
        """Load the app in a new page (the earlier page closed): nothing left over from it."""
        if self.page is not None:
            self.page.close()
        self.page = self.browser.new_page(viewport=self.viewport)
        self.page.on("pageerror", lambda e: self.page_errors.append(str(e)))
        self.page.on("console", lambda m: m.type == "error" and self.console_errors.append(m.text))
        self.page.goto(self.server.url)
        self.page.wait_for_function(
            "() => window.app && window.app.graph && window.LiteGraph"
            " && LiteGraph.registered_node_types['TomesdExtTokenMerging'] && window.app.extensionManager",
            timeout=300_000)  # a deadline for a hung load, not a timing: a loaded machine is slow

    def close(self):
        self.browser.close()

    def frontend_version(self):
        """The version the loaded app states of itself."""
        return self.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__")

    def evaluate(self, script, arg=None):
        return self.page.evaluate(script, arg)

    def open_template(self, name, timeout=30_000, fresh=True):
        """Open example workflow ``name`` through the template browser (click its card); fresh:
        in a new page (a page that opened many workflows grows, and its renderer was seen to
        crash on a loaded machine)."""
        if fresh:
            self.new_page()
        self.page.keyboard.press("Escape")
        self.evaluate("() => window.app.extensionManager.command.execute('Comfy.BrowseTemplates')")
        # the pack's own category in the browser's sidebar (Extensions > <pack folder>)
        # (a visible one: a template browser closed a moment ago may still be in the page)
        self.page.locator(f'[role="dialog"] :text-is("{PACK}"):visible').first.click(timeout=timeout)
        # the card: "template-workflow-<name>" (1.35), "template-workflow-<source>-<name>" (1.58)
        card = self.page.locator(f'[data-testid="template-workflow-{name}"], '
                                 f'[data-testid^="template-workflow-"][data-testid$="-{name}"]')
        card.first.wait_for(state="visible", timeout=timeout)
        tabs = "window.app.extensionManager.workflow"
        opened = self.evaluate(f"() => {tabs}.openWorkflows.length")
        card.first.click()
        # loaded: the browser closed itself and the workflow is open in a new, active tab (named
        # after the template; "name (2)" when it is open already)
        self.page.wait_for_function(
            "([name, opened]) => !document.querySelector('[data-testid^=\"template-workflow-\"]')"
            f" && {tabs}.openWorkflows.length > opened"
            f" && ({tabs}.activeWorkflow?.filename + ' (').startsWith(name + ' (')",
            arg=[name, opened], timeout=timeout)
        self.page.wait_for_timeout(500)  # toasts of the load appear right after

    def load_api(self, prompt, name):
        self.evaluate("([p, name]) => window.app.loadApiJson(p, name)", [prompt, name])

    def shown_problems(self):
        """Error/warning toasts, the error overlay of newer frontends (missing nodes or models,
        bad values) and open dialogs, as their texts."""
        return self.evaluate("""() => [
          ...Array.from(document.querySelectorAll('.p-toast-message-error, .p-toast-message-warn')).map(e => 'toast: ' + e.innerText),
          ...Array.from(document.querySelectorAll('[data-testid="error-overlay"]')).filter(e => e.offsetParent !== null).map(e => 'overlay: ' + e.innerText.slice(0, 300)),
          ...Array.from(document.querySelectorAll('.p-dialog, [role="dialog"]')).filter(e => e.offsetParent !== null).map(e => 'dialog: ' + e.innerText.slice(0, 300)),
        ]""")

    def queued_prompt(self):
        """What the app would send to /prompt for the open graph (API format)."""
        return self.evaluate("async () => (await window.app.graphToPrompt()).output")

    def node_boxes(self):
        return self.evaluate(NODE_BOXES)

    def cut_texts(self):
        """Nodes narrower than their title or a one-line widget's label and value need (the
        frontend would cut them short with an ellipsis)."""
        return self.evaluate(CUT_TITLES)

    def screenshot(self, path, **kw):
        self.evaluate(FIT_VIEW, [110, 70])
        self.page.wait_for_timeout(300)
        self.page.screenshot(path=path, **kw)


CUT_TITLES = """() => {
  """ + NEEDED_WIDTH + """
  return window.app.graph.nodes.filter(n => n.size[0] + 0.5 < neededWidth(n))
    .map(n => n.id + ' ' + n.title + ': width ' + n.size[0] + ' < ' + neededWidth(n));
}"""


def overlaps(boxes):
    """Pairs of nodes whose boxes (title bar included) intersect."""
    out = []
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            (ax, ay, aw, ah), (bx, by, bw, bh) = a["box"], b["box"]
            if ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah:
                out.append((f"{a['id']} {a['title']}", f"{b['id']} {b['title']}"))
    return out


def cramped(boxes):
    """Nodes smaller than their widgets need (rows cut off at the bottom)."""
    return [f"{b['id']} {b['title']}: {b['size']} < {b['needed']}" for b in boxes
            if b["size"][0] + 0.5 < b["needed"][0] or b["size"][1] + 0.5 < b["needed"][1]]


def write_examples(server, names=None):
    """Build example_workflows/<name>.json from the API copies in the frontend, with thumbnails
    and the docs/img screenshots (see the module docstring)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        app = App(server, pw)
        try:
            for name in names or workflow_names():
                prompt = json.load(open(os.path.join(API_COPIES, f"{name}.api.json")))
                app.load_api(prompt, name)
                app.evaluate(LAYOUT, [NOTES.get(name, ""), 50])
                # through JSON in the page: undefined fields are dropped there (the app's schema refuses null)
                graph = app.evaluate("() => JSON.parse(JSON.stringify(window.app.graph.serialize()))")
                graph.pop("extra", None)
                with open(os.path.join(EXAMPLES, f"{name}.json"), "w") as f:
                    json.dump(graph, f, indent=1)
                    f.write("\n")
                problems = overlaps(app.node_boxes()) + cramped(app.node_boxes()) + app.cut_texts()
                assert not problems, problems
                print("wrote", name)
            # the pictures: each written file opened from the template browser, as a user sees it
            # (each in a new page: no tabs left over from the building or the other pictures)
            for name in names or workflow_names():
                app.open_template(name)
                assert not app.shown_problems(), app.shown_problems()
                app.screenshot(os.path.join(EXAMPLES, f"{name}.jpg"), type="jpeg", quality=80)
                app.screenshot(os.path.join(REPO, "docs", "img", f"comfyui_{name}.png"))
        finally:
            app.close()


def main():
    base = tempfile.mkdtemp(prefix="tomesd_ext_comfyui_")
    # the node packs the workflows need (COMFYUI_PACKS_DIR), e.g. AnimateDiff-Evolved
    needed = sorted({p for name in (sys.argv[1:] or workflow_names()) for p in workflow_packs(name)})
    missing = [p for p in needed if node_pack(p) is None]
    if missing:
        sys.exit(f"the workflows need the node packs {missing} under COMFYUI_PACKS_DIR")
    server = ComfyServer(base, packs=[node_pack(p) for p in needed])
    try:
        server.wait_ready()
        write_examples(server, sys.argv[1:] or None)
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()

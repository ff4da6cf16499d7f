"""Helpers to run ComfyUI (COMFYUI_PATH) in-process or as a server on loopback, for the tests.

In-process: ``import_comfy()`` puts COMFYUI_PATH on sys.path with ``--cpu`` semantics.
Server: ``ComfyServer`` starts ``main.py --cpu`` with a temporary base directory (models,
custom_nodes, input, output, temp, user) and an in-memory database, so nothing is written into
the ComfyUI checkout; our repository is symlinked into its ``custom_nodes``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = os.path.join(REPO, "example_workflows")  # the shipped UI workflows (+ thumbnails)
API_COPIES = os.path.join(REPO, "tests", "comfy", "workflows")  # their API-format copies
FRONTEND_ONLY = ("Note", "MarkdownNote")  # node types the frontend never queues
TOME_SIMPLE, TOME_ADVANCED = "TomesdExtTokenMergingSimple", "TomesdExtTokenMerging"


def tome_key(prompt):
    """The key of the ToMe node (simple or advanced) in an API prompt."""
    return next(k for k, v in prompt.items() if v["class_type"] in (TOME_SIMPLE, TOME_ADVANCED))


def as_advanced_tome(node, **inputs):
    """An API prompt's ToMe node as the advanced node, in place: a simple node's values, the
    advanced node's defaults for the inputs it does not show (what it runs with), then
    ``inputs``. For a test run that needs an input the simple node does not show, such as
    min_tokens 0 (a 64 px latent is below the auto-skip). Returns the node."""
    if node["class_type"] == TOME_SIMPLE:
        from nodes.tome import TomesdExtTokenMergingSimple

        node["class_type"] = TOME_ADVANCED
        node["inputs"] = {**TomesdExtTokenMergingSimple.hidden_defaults(), **node["inputs"]}
    assert node["class_type"] == TOME_ADVANCED, node["class_type"]
    node["inputs"].update(inputs)
    return node


# Shipped workflows that need other node packs (node_pack names) beside ours: the tests that
# run every workflow on the plain server leave them to a server with those packs.
WORKFLOW_PACKS = {"sd15_animatediff_tome": ("ComfyUI-AnimateDiff-Evolved",)}


def workflow_packs(name) -> tuple:
    """The node packs workflow ``name`` (``x``, ``x.json`` or ``x.api.json``) needs besides ours."""
    return WORKFLOW_PACKS.get(name.split(".")[0], ())


def workflow_file(name):
    """The path of workflow ``name``: ``x.api.json`` is an API copy, ``x.json`` a shipped UI workflow."""
    return os.path.join(API_COPIES if name.endswith(".api.json") else EXAMPLES, name)


def load_workflow(name):
    with open(workflow_file(name)) as f:
        return json.load(f)


def comfyui_path():
    path = os.environ.get("COMFYUI_PATH")
    return path if path and os.path.isfile(os.path.join(path, "main.py")) else None


def old_comfyui_path():
    """The older ComfyUI release the smoke tests run on (COMFYUI_OLD_PATH), or None."""
    path = os.environ.get("COMFYUI_OLD_PATH")
    return path if path and os.path.isfile(os.path.join(path, "main.py")) else None


def old_comfyui_pylib():
    """The folder with the older release's own frontend, templates and docs packages, put first on
    its PYTHONPATH (COMFYUI_OLD_PYLIB, default: pylib beside COMFYUI_OLD_PATH); None if absent."""
    path = os.environ.get("COMFYUI_OLD_PYLIB")
    if not path and old_comfyui_path():
        path = os.path.join(os.path.dirname(os.path.abspath(old_comfyui_path())), "pylib")
    return path if path and os.path.isdir(path) else None


def old_missing_reason() -> str:
    path = os.environ.get("COMFYUI_OLD_PATH")
    what = f"COMFYUI_OLD_PATH={path} has no main.py" if path else "COMFYUI_OLD_PATH is not set"
    return (f"{what}: point it at the older ComfyUI release (tested: v0.3.64) to run its smoke tests "
            "(`make test` unpacks one from COMFYUI_OLD_SNAPSHOT; docs/development.md)")


def run_pack_probe(comfy_path, pythonpath=None, timeout=600):
    """tests/comfy/pack_probe.py in a fresh process on the ComfyUI at ``comfy_path`` (``pythonpath``
    first on its path): the pack loaded as ComfyUI loads it and each node run there, without
    diffusers and transformers; returns the probe's report (a dict)."""
    env = dict(os.environ, COMFYUI_PATH=comfy_path)
    env.pop("PYTHONPATH", None)  # the pack must load from its folder, as ComfyUI loads it
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    probe = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pack_probe.py")
    done = subprocess.run([sys.executable, probe], cwd=comfy_path, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"pack_probe failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def release_of(comfy_path) -> str:
    """The release number in a ComfyUI folder's comfyui_version.py (e.g. "0.8.0")."""
    with open(os.path.join(comfy_path, "comfyui_version.py")) as f:
        return f.read().split("__version__")[1].split('"')[1]


def check_pack_probe(report, comfy_path):
    """The probe's report from the ComfyUI at ``comfy_path``: our four nodes registered, loaded
    with diffusers and transformers blocked, each merging in ComfyUI's sampler without touching
    its input model, both ToMe nodes exact at ratio 0, and no file of ours importing the blocked
    libraries."""
    assert report["comfyui"] == release_of(comfy_path)
    assert report["nodes"] == ["TomesdExtImportanceMerging", "TomesdExtTokenMerging", "TomesdExtTokenMergingSimple",
                               "TomesdExtVidToMe"]
    assert report["loaded_without"] == ["diffusers", "transformers"]
    assert report["refused_imports"] == [], report["refused_imports"]
    assert report["foreign_modules"] == [], report["foreign_modules"]
    for node_id, run in report["runs"].items():
        assert run["finite"] and run["changed"] and run["input_untouched"], (node_id, run)
    assert report["runs"][TOME_ADVANCED]["ratio0_exact"] and report["runs"][TOME_SIMPLE]["ratio0_exact"]


def node_pack(name):
    """The folder of the node pack ``name`` (e.g. "ComfyUI-GGUF") unpacked under COMFYUI_PACKS_DIR
    (scripts/comfyui_packs_for_tests.sh: PACKS_DIR/<snapshot>/<name>), or None."""
    root = os.environ.get("COMFYUI_PACKS_DIR")
    if not root or not os.path.isdir(root):
        return None
    found = sorted(os.path.join(root, snap, name) for snap in os.listdir(root)
                   if os.path.isfile(os.path.join(root, snap, name, "__init__.py")))
    return found[-1] if found else None


def require_node_pack(name):
    """node_pack(name), or skip the test saying how to get it (in CI, CI=true: fail)."""
    import pytest

    path = node_pack(name)
    if path is None:
        root = os.environ.get("COMFYUI_PACKS_DIR")
        reason = (f"no node pack {name} under COMFYUI_PACKS_DIR={root or '(not set)'} (`make test` unpacks the "
                  "snapshots of COMFYUI_PACK_SNAPSHOTS there; docs/development.md)")
        if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
            pytest.fail(f"CI: {reason}")
        pytest.skip(reason)
    return path


def missing_reason() -> str:
    """Why there is no ComfyUI to test against (when comfyui_path() is None)."""
    path = os.environ.get("COMFYUI_PATH")
    what = f"COMFYUI_PATH={path} has no main.py" if path else "COMFYUI_PATH is not set"
    return (f"{what}: point it at a ComfyUI checkout (tested: v0.8.0) to run the ComfyUI tests "
            "(`make test` unpacks one from COMFYUI_SNAPSHOT; docs/development.md)")


def import_comfy():
    """Import ComfyUI's packages in this process on the CPU; returns the ComfyUI path."""
    path = comfyui_path()
    import nodes  # noqa: F401  (ours: cached before ComfyUI's nodes.py becomes importable)

    # pytest imports the repository's root __init__.py as a package named after the checkout
    # folder; a checkout folder called "comfy" would shadow ComfyUI's package.
    shadow = sys.modules.get("comfy")
    if shadow is not None and os.path.abspath(getattr(shadow, "__file__", "") or "") == os.path.join(REPO, "__init__.py"):
        del sys.modules["comfy"]
        import inspect

        inspect._filesbymodname.pop("comfy", None)  # else inspect.getmodule trips on the swap
        parent = os.path.dirname(REPO)
        sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != parent]
    if path not in sys.path:
        sys.path.insert(0, path)
    from comfy.cli_args import args

    args.cpu = True
    # torch's scaled_dot_product_attention, as the servers here run (--use-pytorch-cross-attention),
    # not ComfyUI's CPU default, its sub-quadratic attention in Python: that one took ~80% of the
    # in-process samplers' time (softmax and baddbmm over chunks) and pages in GBs per run
    args.use_pytorch_cross_attention = True
    import comfy.model_management  # noqa: F401  (device and attention chosen now, from args)

    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    def __init__(self, base_dir: str, checkpoints=None, python=sys.executable, comfy_path=None, pythonpath=None,
                 packs=(), front_end_root=None, args=()):
        """comfy_path: the ComfyUI to start (default COMFYUI_PATH); pythonpath: put first on its
        path (an older release's own frontend packages); packs: folders of other node packs
        (node_pack) linked into its custom_nodes beside ours; front_end_root: the folder of another
        frontend's static files to serve (ComfyUI's --front-end-root); args: more main.py arguments."""
        self.base = base_dir
        checkpoints = checkpoints or {}
        for sub in ("models/checkpoints", "models/diffusion_models", "models/text_encoders", "models/vae",
                    "custom_nodes", "input", "output", "temp", "user"):
            os.makedirs(os.path.join(base_dir, sub), exist_ok=True)
        for name, target in checkpoints.items():
            self.add_checkpoint(name, target)
        pack = os.path.join(base_dir, "custom_nodes", "tomesd-ext")
        if not os.path.lexists(pack):
            os.symlink(REPO, pack)
        for other in packs:
            link = os.path.join(base_dir, "custom_nodes", os.path.basename(other.rstrip("/")))
            if not os.path.lexists(link):
                os.symlink(other, link)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(base_dir, "comfyui.log")
        cmd = [
            python, "main.py", "--cpu", "--use-pytorch-cross-attention", "--listen", "127.0.0.1",
            "--port", str(self.port), "--base-directory", base_dir, "--database-url", "sqlite:///:memory:",
            "--disable-auto-launch", "--disable-api-nodes", *args,
        ] + (["--front-end-root", front_end_root] if front_end_root else [])
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("PYTHONPATH", None)  # the pack must load from custom_nodes, not from the test's path
        if pythonpath:
            env["PYTHONPATH"] = pythonpath
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=comfy_path or comfyui_path(), stdout=self.log, stderr=subprocess.STDOUT,
                                     env=env)

    def add_checkpoint(self, name, target):
        """Symlink a checkpoint into models/checkpoints (ComfyUI rescans the folder on use)."""
        self.add_model("checkpoints", name, target)

    def add_model(self, folder, name, target):
        """Symlink a model file into models/<folder> (checkpoints, text_encoders, ...)."""
        link = os.path.join(self.base, "models", folder, name)
        if not os.path.lexists(link):
            os.symlink(target, link)

    def wait_ready(self, timeout=180.0):
        end = time.time() + timeout
        while time.time() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.read_log()[-4000:]}")
            try:
                self.get("/system_stats")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        raise TimeoutError(f"ComfyUI did not start in {timeout} s:\n{self.read_log()[-4000:]}")

    def read_log(self) -> str:
        self.log.flush()
        with open(self.log_path) as f:
            return f.read()

    def get(self, route):
        with urllib.request.urlopen(self.url + route, timeout=30) as r:
            return json.loads(r.read())

    def post(self, route, body):
        req = urllib.request.Request(self.url + route, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                body = r.read()
                return r.status, json.loads(body) if body else None
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def run_prompt(self, prompt, timeout=600.0):
        """Queue an API-format prompt and wait; returns its history entry (raises on errors)."""
        status, reply = self.post("/prompt", {"prompt": prompt, "client_id": "tomesd-ext-tests"})
        if status != 200:
            raise AssertionError(f"/prompt rejected the workflow ({status}): {json.dumps(reply)[:2000]}")
        pid = reply["prompt_id"]
        end = time.time() + timeout
        while time.time() < end:
            try:
                hist = self.get(f"/history/{pid}")
            except (TimeoutError, urllib.error.URLError, ConnectionError):  # a server busy sampling may answer late
                time.sleep(1.0)
                continue
            if pid in hist and hist[pid].get("status", {}).get("completed") is not None:
                entry = hist[pid]
                if entry["status"].get("status_str") != "success":
                    raise AssertionError(f"prompt failed: {json.dumps(entry['status'])[:3000]}\n{self.read_log()[-3000:]}")
                return entry
            time.sleep(0.5)
        raise TimeoutError(f"prompt {pid} did not finish in {timeout} s")

    def output_files(self, entry):
        files = []
        for out in entry["outputs"].values():
            for img in out.get("images", []):
                files.append(os.path.join(self.base, img.get("type", "output"), img.get("subfolder", ""), img["filename"]))
        return files

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


def comfy_model_from_diffusers(unet, family="sd", heads=None):
    """A ComfyUI MODEL (ModelPatcher) with the weights of a diffusers UNet, in this process.

    The state dict goes through our LDM key writer and ComfyUI's own detection and loading, so
    both implementations run the same weights. heads: ComfyUI unet_config overrides for the
    tiny test configs (the real ones come from ComfyUI's model table).
    """
    import torch

    import comfy.model_detection
    import comfy.model_patcher
    import comfy.supported_models

    from tomesd_ext.models.checkpoint import unet_state_dict

    prefix = "model.diffusion_model."
    sd = {k: v.float() for k, v in unet_state_dict(unet).items()}
    config = comfy.model_detection.detect_unet_config(sd, prefix)
    cls = comfy.supported_models.SDXL if family == "sdxl" else comfy.supported_models.SD15
    model_config = cls(config)
    model_config.unet_config.update(heads or {})
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model(sd, prefix)
    model.load_model_weights(sd, prefix)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def run_unet(patcher, x, timestep, context, sigma=None, y=None, cond_or_uncond=None):
    """One UNet call as ComfyUI's sampler makes it: the patcher's object patches applied, its
    wrappers and transformer_options (patches; cond_or_uncond: the order of the batch's
    chunks, 0 = cond, 1 = uncond) passed down; returns the raw UNet output."""
    import torch

    import comfy.patcher_extension

    patcher.patch_model()
    try:
        options = dict(patcher.model_options.get("transformer_options", {}))
        options["wrappers"] = comfy.patcher_extension.copy_nested_dicts(patcher.wrappers)
        t = torch.full((x.shape[0],), float(timestep))
        options["sigmas"] = torch.full((x.shape[0],), float(sigma if sigma is not None else 1.0))
        if cond_or_uncond is not None:
            options["cond_or_uncond"] = list(cond_or_uncond)
        with torch.no_grad():
            return patcher.model.diffusion_model(x, t, context=context, y=y, transformer_options=options)
    finally:
        patcher.unpatch_model()


WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
UPLOAD_KEYS = ("image_upload", "audio_upload", "video_upload", "file_upload")


def _kind(spec):
    kind = spec[0]
    return "COMBO" if isinstance(kind, list) else kind


def widget_inputs(info):
    """Ordered (name, spec) of a node's widget inputs per /object_info (required, then optional)."""
    out = []
    for section in ("required", "optional"):
        for name, spec in (info["input"].get(section) or {}).items():
            if _kind(spec) in WIDGET_TYPES and not (len(spec) > 1 and (spec[1] or {}).get("forceInput")):
                out.append((name, spec))
    return out


def check_widget_value(name, spec, value, file_lists=("ckpt_name", "file", "unet_name", "clip_name", "clip_name1", "clip_name2", "vae_name")):
    """None if ``value`` fits the input spec of /object_info, else a message."""
    kind, opts = _kind(spec), (spec[1] if len(spec) > 1 else {}) or {}
    if kind == "COMBO":
        choices = spec[0] if isinstance(spec[0], list) else opts.get("options", [])
        if name in file_lists:  # a user's model file name: any string
            return None if isinstance(value, str) else f"{name}={value!r} is not a file name"
        return None if value in choices else f"{name}={value!r} not in {choices[:10]}"
    if kind == "BOOLEAN":
        return None if isinstance(value, bool) else f"{name}={value!r} is not a boolean"
    if kind == "STRING":
        return None if isinstance(value, str) else f"{name}={value!r} is not a string"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind == "INT" and not float(value).is_integer()):
        return f"{name}={value!r} is not a {kind}"
    if "min" in opts and value < opts["min"] or "max" in opts and value > opts["max"]:
        return f"{name}={value} outside [{opts.get('min')}, {opts.get('max')}]"
    return None


def ui_to_api(graph, object_info):
    """Convert a UI-format workflow (version 0.4) to the API format using /object_info, checking
    every widget value on the way; returns (prompt, problems)."""
    problems = []
    links = {link[0]: link for link in graph["links"]}
    prompt = {}
    for node in graph["nodes"]:
        if node.get("mode", 0) in (2, 4) or node["type"] in FRONTEND_ONLY:
            continue
        info = object_info.get(node["type"])
        if info is None:
            problems.append(f"node {node['id']}: unknown type {node['type']}")
            continue
        inputs = {}
        values = list(node.get("widgets_values") or [])
        linked = {i["name"] for i in node.get("inputs", []) if i.get("link") is not None}
        for name, spec in widget_inputs(info):
            if not values:
                problems.append(f"node {node['id']} ({node['type']}): no value for {name}")
                break
            value = values.pop(0)
            if len(spec) > 1 and (spec[1] or {}).get("control_after_generate"):
                control = values.pop(0) if values else None
                if control not in ("fixed", "increment", "decrement", "randomize"):
                    problems.append(f"node {node['id']}: bad control_after_generate {control!r}")
            if len(spec) > 1 and any(k in UPLOAD_KEYS and v for k, v in (spec[1] or {}).items()):
                # the frontend's upload button after the file combo saves a value of its own
                upload = values.pop(0) if values else None
                if upload != "image":
                    problems.append(f"node {node['id']}: expected the upload widget's value after {name}, got {upload!r}")
            if name in linked:
                continue
            msg = check_widget_value(name, spec, value)
            if msg:
                problems.append(f"node {node['id']} ({node['type']}): {msg}")
            inputs[name] = value
        if values:
            problems.append(f"node {node['id']} ({node['type']}): {len(values)} extra widget values {values}")
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                _id, src, src_slot, _dst, _dst_slot, _type = links[slot["link"]]
                inputs[slot["name"]] = [str(src), src_slot]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt, problems


def run_node(cls, model, **kw):
    """Run one of our merge nodes on ``model`` with its defaults, min_tokens 0 (test grids are
    small; the auto-skip has its own test) and the overrides ``kw``; returns the patched MODEL."""
    values = node_defaults(cls, min_tokens=0, **kw)
    return cls().patch(model, **values)[0]


def node_defaults(cls, **over):
    """The default widget values of a node class (INPUT_TYPES order), with overrides."""
    spec = cls.INPUT_TYPES()["required"]
    values = {k: v[1]["default"] for k, v in spec.items() if k != "model"}
    values.update(over)
    return values


def tome_node(model, **kw):
    from nodes.tome import TomesdExtTokenMerging

    return run_node(TomesdExtTokenMerging, model, **kw)


def importance_node(model, **kw):
    from nodes.importance import TomesdExtImportanceMerging

    return run_node(TomesdExtImportanceMerging, model, **kw)


def fake_dit_model():
    """A stand-in MODEL whose denoiser is not a UNet (class FakeDiT): nodes must pass it through."""
    import torch

    class FakeDiT(torch.nn.Module):
        pass

    class FakeBase:
        diffusion_model = FakeDiT()

    class FakePatcher:
        model = FakeBase()

    return FakePatcher()


def patch_state(opts, max_downsample, sigma_start=float("inf"), sigma_end=0.0, policy=None):
    """The PatchState a node builds, without ComfyUI: a MergeRuntime with the ToMe policy (or
    ``policy``) behind it."""
    from tomesd_ext.comfy import PatchState
    from tomesd_ext.core import MergeRuntime, TomePolicy

    return PatchState(MergeRuntime(policy or TomePolicy(opts), max_downsample, sigma_start, sigma_end))


def runtime_plan(metric, latent_hw, step_key, opts, max_downsample, policy=None):
    """The plan a fresh runtime computes for ``metric`` in a call at (latent_hw, step_key)."""
    from tomesd_ext.core import MergeRuntime, TomePolicy

    runtime = MergeRuntime(policy or TomePolicy(opts), max_downsample)
    runtime.begin_call(latent_hw, step_key)
    return runtime.plan_for(metric)

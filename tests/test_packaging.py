"""Packaging of the node pack and the library: the registry's own validation of pyproject.toml
(comfy-cli's `comfy node validate`), the dependencies a stock install gets, and the library
without diffusers/transformers (a subprocess where they cannot be imported)."""

import os
import re
import subprocess
import sys

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the registry's CLI, installed from the package index into a folder of its own (its many
# dependencies stay out of the project's environment); pinned so the check does not drift
COMFY_CLI = "comfy-cli==1.23.0"
IN_CI = os.environ.get("CI", "").lower() in ("true", "1", "yes")
BLOCK = """
import sys
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("diffusers", "transformers"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Blocker())
"""


def oldest_comfyui():
    """The pack's OLDEST_COMFYUI (root __init__.py), read without importing it."""
    with open(os.path.join(REPO, "__init__.py")) as f:
        return re.search(r'^OLDEST_COMFYUI = "([0-9.]+)"', f.read(), re.M).group(1)


def _pyproject():
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


@pytest.fixture(scope="session")
def comfy_cli():
    """A folder holding comfy-cli (PYTHONPATH for `python -m comfy_cli`), installed on first use."""
    cache = os.environ.get("TOMESD_EXT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tomesd_ext")
    target = os.path.join(cache, COMFY_CLI.replace("==", "-"))
    if not os.path.isdir(target):
        os.makedirs(cache, exist_ok=True)
        tmp = f"{target}.tmp{os.getpid()}"
        done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", tmp, COMFY_CLI],
                              capture_output=True, text=True)
        if done.returncode != 0:
            reason = f"pip install {COMFY_CLI} failed: {done.stderr[-2000:]}"
            if IN_CI:
                pytest.fail(reason)
            pytest.skip(reason)
        os.replace(tmp, target)  # whole or absent, also for concurrent runs
    return target


def test_comfy_node_validate_accepts_pyproject(comfy_cli, tmp_path):
    # comfy-cli keeps its settings in HOME; the ruff it runs would leave its cache in the checkout
    env = dict(os.environ, PYTHONPATH=comfy_cli, HOME=str(tmp_path), RUFF_CACHE_DIR=str(tmp_path / "ruff"))
    done = subprocess.run([sys.executable, "-m", "comfy_cli", "node", "validate"], cwd=REPO, env=env,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "All validation checks passed" in out, out
    # a field it cannot read (e.g. requires-comfyui) is only a warning, dropped at publishing
    assert "Warning" not in out and "Error" not in out, out


def test_stock_install_gets_no_diffusers_side_dependencies():
    project = _pyproject()["project"]
    assert project["dependencies"] == ["torch>=2.1"]
    assert any(d.startswith("diffusers") for d in project["optional-dependencies"]["diffusers"])
    assert "tomesd-ext[diffusers," in project["optional-dependencies"]["dev"][0]
    with open(os.path.join(REPO, "requirements.txt")) as f:  # what ComfyUI-Manager pip-installs
        assert [line for line in f if line.strip() and not line.lstrip().startswith("#")] == []


def test_library_without_diffusers_and_transformers():
    """The core, the ComfyUI adapter and the node definitions import; the diffusers adapter
    refuses with an ImportError naming the extra to install."""
    code = BLOCK + """
import tomesd_ext, tomesd_ext.core, tomesd_ext.comfy
import nodes
assert sorted(nodes.NODE_DEFINITIONS) == ["TomesdExtImportanceMerging", "TomesdExtTokenMerging",
                                         "TomesdExtTokenMergingSimple", "TomesdExtVidToMe"]
for entry in ("from tomesd_ext import apply_tome", "import tomesd_ext.diffusers"):
    try:
        exec(entry)
    except ImportError as e:
        print(e)
    else:
        raise SystemExit(entry + ": no ImportError")
"""
    env = dict(os.environ, PYTHONPATH=REPO)
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    messages = done.stdout.strip().splitlines()
    assert len(messages) == 2 and all('pip install "tomesd-ext[diffusers]"' in m for m in messages), messages


def test_requires_comfyui_is_the_oldest_release_the_pack_names():
    assert _pyproject()["tool"]["comfy"]["requires-comfyui"] == ">=" + oldest_comfyui()


@pytest.mark.parametrize("has_v3", [False, True])
def test_pack_in_a_comfyui_without_v3_logs_one_line(tmp_path, has_v3):
    """Loaded as ComfyUI loads a custom node (folder_paths already imported) in a ComfyUI without
    comfy_api.v0_0_2: no exception, one warning naming the release needed; with it: silence."""
    if has_v3:
        (tmp_path / "comfy_api" / "v0_0_2").mkdir(parents=True)
        (tmp_path / "comfy_api" / "__init__.py").write_text("")
        (tmp_path / "comfy_api" / "v0_0_2" / "__init__.py").write_text("")
    code = f"""
import importlib.util, logging, sys, types
logging.basicConfig(level=logging.INFO, format="%(name)s|%(message)s")
sys.modules["folder_paths"] = types.ModuleType("folder_paths")
spec = importlib.util.spec_from_file_location("pack_under_test", {os.path.join(REPO, "__init__.py")!r})
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
print("loaded", hasattr(module, "comfy_entrypoint"))
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(tmp_path)),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "loaded True", done.stdout + done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("tomesd_ext|")]
    if has_v3:
        assert lines == [], lines
    else:
        assert len(lines) == 1 and f"ComfyUI v{oldest_comfyui()} or newer" in lines[0], done.stderr

"""Packaging of the node pack and the library: the registry's own validation of pyproject.toml
(comfy-cli's `comfy node validate`), the dependencies a stock install gets, and the library
without diffusers/transformers (a subprocess where they cannot be imported)."""

import os
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
    env = dict(os.environ, PYTHONPATH=comfy_cli, HOME=str(tmp_path))  # comfy-cli keeps its settings in HOME
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
assert sorted(nodes.NODE_DEFINITIONS) == ["TomesdExtImportanceMerging", "TomesdExtTokenMerging", "TomesdExtVidToMe"]
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

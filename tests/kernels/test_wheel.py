"""A built wheel carries the CUDA sources, and the installed package finds them.

The extension is compiled on the user's machine from tomesd_ext/kernels/cuda/, so the .cu/.cuh/.cpp
files must be package data. Builds the wheel offline with the installed setuptools (`pip wheel
--no-build-isolation --no-index`; `python -m build` is not needed) from a copy of the package, so
the checkout gets no build/ or egg-info. A few seconds; no GPU needed.
"""

import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tomesd_ext.kernels import build

ROOT = Path(__file__).resolve().parents[2]
CUDA_FILES = sorted(p.name for p in build.SOURCE_DIR.iterdir() if p.suffix in (".cu", ".cuh", ".cpp"))


def _can_build_wheels() -> bool:
    """setuptools >= 70.1 has bdist_wheel built in; older ones need the wheel package."""
    if importlib.util.find_spec("setuptools") is None:
        return False
    from importlib.metadata import version

    major, minor = (int(part) for part in version("setuptools").split(".")[:2])
    return (major, minor) >= (70, 1) or importlib.util.find_spec("wheel") is not None


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    if not _can_build_wheels():
        pytest.skip("building a wheel offline needs setuptools >= 70.1 (or setuptools and wheel) installed")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "tomesd_ext", src / "tomesd_ext", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp / "dist"
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(out), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (whl,) = out.glob("tomesd_ext-*.whl")
    return whl


def test_sources_are_in_the_package():
    assert build.SOURCE_DIR == Path(build.__file__).resolve().parent / "cuda"
    assert set(build.SOURCES) <= set(CUDA_FILES)
    assert {"match.cu", "merge.cu", "common.cuh", "bindings.cpp"} <= set(CUDA_FILES)
    assert not (ROOT / "cuda").exists(), "the CUDA sources live in tomesd_ext/kernels/cuda/ only"


def test_wheel_lists_the_cuda_sources(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [f for f in CUDA_FILES + ["README.md"] if f"tomesd_ext/kernels/cuda/{f}" not in names]
    assert not missing, f"{wheel.name} lacks {missing}"


def test_installed_wheel_finds_its_sources(wheel, tmp_path):
    """Unpacked like an install, the build module resolves the sources inside that copy."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = (
        "from tomesd_ext.kernels import build; "
        "print(build.SOURCE_DIR); "
        "print(all((build.SOURCE_DIR / n).is_file() for n in build.SOURCES))"
    )
    env = dict(os.environ, PYTHONPATH=str(site))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    source_dir, found = proc.stdout.split()
    assert Path(source_dir) == site / "tomesd_ext" / "kernels" / "cuda"
    assert found == "True"

"""Build and load the CUDA extension (sources in tomesd_ext/kernels/cuda/) with torch.utils.cpp_extension.

The build directory is cached per torch and CUDA version: ~/.cache/tomesd_ext/<torch>-cu<cuda>/
(override the root with TOMESD_EXT_CACHE). Ninja rebuilds only what changed, so the second load
in a process-fresh interpreter takes about a second. Without a visible GPU set TORCH_CUDA_ARCH_LIST
(e.g. "9.0"); with one, torch targets the visible devices' architectures.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import List, Optional

EXT_NAME = "tomesd_ext_cuda"
SOURCE_DIR = Path(__file__).resolve().parent / "cuda"  # shipped in the wheel as package data
SOURCES = ("bindings.cpp", "match.cu", "merge.cu")


def sources() -> List[str]:
    return [str(SOURCE_DIR / name) for name in SOURCES]


def build_dir() -> Path:
    import torch

    root = Path(os.environ.get("TOMESD_EXT_CACHE") or Path.home() / ".cache" / "tomesd_ext")
    tag = f"{torch.__version__}-cu{torch.version.cuda or 'none'}".replace("+", "_")
    return root / tag


def _is_toolkit(path) -> bool:
    return bool(path) and Path(path, "bin", "nvcc").exists() and Path(path, "include", "cuda_runtime_api.h").exists()


def cuda_home() -> Optional[str]:
    """A CUDA toolkit with nvcc and the runtime headers.

    torch guesses CUDA_HOME from the nvcc on PATH, which is wrong when nvcc is a link in
    /usr/local/bin (it then finds no headers); fall back to the usual install places.
    """
    import torch
    from torch.utils import cpp_extension

    nvcc = shutil.which("nvcc")
    candidates = [
        os.environ.get("CUDA_HOME"),
        os.environ.get("CUDA_PATH"),
        cpp_extension.CUDA_HOME,
        str(Path(os.path.realpath(nvcc)).parents[1]) if nvcc else None,
        "/usr/local/cuda",
        f"/usr/local/cuda-{torch.version.cuda}" if torch.version.cuda else None,
    ]
    return next((c for c in candidates if _is_toolkit(c)), None)


def missing_requirement() -> Optional[str]:
    """Why the extension cannot be built here (None when it can be attempted)."""
    import torch

    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    missing = [name for name in SOURCES if not (SOURCE_DIR / name).is_file()]
    if missing:
        return f"CUDA sources not found in {SOURCE_DIR} ({', '.join(missing)})"
    from torch.utils import cpp_extension

    if cuda_home() is None:
        return "no CUDA toolkit found (nvcc and cuda_runtime_api.h; set CUDA_HOME)"
    if not cpp_extension.is_ninja_available():
        return "ninja not found (pip install ninja)"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler (c++) on PATH"
    return None


_MODULE = None


def load(verbose: bool = False):
    """Compile (if needed) and import the extension; raises RuntimeError with the reason on failure.

    The module is kept once loaded (a process imports it once; later calls return it).
    """
    global _MODULE
    if _MODULE is not None:
        return _MODULE
    reason = missing_requirement()
    if reason is not None:
        raise RuntimeError(reason)
    import torch
    from torch.utils import cpp_extension

    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        raise RuntimeError("no CUDA device to target: set TORCH_CUDA_ARCH_LIST (e.g. '9.0') to build without one")
    home = cuda_home()
    if cpp_extension.CUDA_HOME != home:
        cpp_extension.CUDA_HOME = home  # read by the ninja file writer
    directory = build_dir()
    directory.mkdir(parents=True, exist_ok=True)
    try:
        _MODULE = cpp_extension.load(
            name=EXT_NAME,
            sources=sources(),
            build_directory=str(directory),
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3", "-lineinfo"],
            verbose=verbose,
        )
        return _MODULE
    except Exception as exc:  # compiler errors arrive as RuntimeError/subprocess errors
        raise RuntimeError(f"building the CUDA extension in {directory} failed: {exc}") from exc

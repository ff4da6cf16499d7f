"""The shared library, whether the pack is loaded by ComfyUI or used as a plain package.

ComfyUI imports the repository folder as a package, so the library is the sibling subpackage
``<folder>.tomesd_ext``; tests and a pip install import ``nodes`` top-level and ``tomesd_ext``
from sys.path.
"""

try:
    from ..tomesd_ext import comfy as comfy_adapter, core  # loaded as ComfyUI/custom_nodes/<folder>
except ImportError:
    from tomesd_ext import comfy as comfy_adapter, core

__all__ = ["comfy_adapter", "core"]

"""ComfyUI nodes of tomesd-ext.

The node definitions (nodes/tome.py, importance.py, vidtome.py) import nothing from ComfyUI, so
their schema and option validation are testable without it; nodes/v3.py declares them to ComfyUI
through the V3 node API (see docs/comfyui.md).
"""

from .importance import NODE_DEFINITIONS as _IMPORTANCE, DISPLAY_NAMES as _IMPORTANCE_NAMES
from .tome import NODE_DEFINITIONS as _TOME, DISPLAY_NAMES as _TOME_NAMES
from .vidtome import NODE_DEFINITIONS as _VIDTOME, DISPLAY_NAMES as _VIDTOME_NAMES

NODE_DEFINITIONS = {**_TOME, **_IMPORTANCE, **_VIDTOME}
DISPLAY_NAMES = {**_TOME_NAMES, **_IMPORTANCE_NAMES, **_VIDTOME_NAMES}

__all__ = ["NODE_DEFINITIONS", "DISPLAY_NAMES"]

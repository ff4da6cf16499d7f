"""ComfyUI entry point of the tomesd-ext node pack (this folder goes into ComfyUI/custom_nodes/).

The nodes live in nodes/; the algorithms in tomesd_ext/ are shared with the diffusers adapter.
"""

try:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F401
except ImportError:  # imported outside ComfyUI as a plain folder (e.g. by test collection)
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]

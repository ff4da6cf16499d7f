"""ComfyUI entry point of the tomesd-ext node pack (this folder goes into ComfyUI/custom_nodes/).

The nodes live in nodes/ (classic node API); the algorithms in tomesd_ext/ are shared with the
diffusers adapter.
"""

try:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
except ImportError:
    if __package__:  # loaded as a package (ComfyUI): a real failure, let ComfyUI report it
        raise
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}  # imported as a plain file

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]

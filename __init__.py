"""ComfyUI entry point of the tomesd-ext node pack (this folder goes into ComfyUI/custom_nodes/).

V3 node API: ComfyUI calls ``comfy_entrypoint`` and gets the nodes of nodes/v3.py. The module
exports no NODE_CLASS_MAPPINGS (ComfyUI would then load it the classic way and ignore
``comfy_entrypoint``). Importing this file needs no ComfyUI; the algorithms in tomesd_ext/ are
shared with the diffusers adapter.
"""


async def comfy_entrypoint():
    """Called by ComfyUI when it loads the pack: the extension listing our nodes."""
    from .nodes.v3 import TomesdExtExtension

    return TomesdExtExtension()


__all__ = ["comfy_entrypoint"]

"""ComfyUI entry point of the tomesd-ext node pack (this folder goes into ComfyUI/custom_nodes/).

V3 node API: ComfyUI calls ``comfy_entrypoint`` and gets the nodes of nodes/v3.py. The module
exports no NODE_CLASS_MAPPINGS (ComfyUI would then load it the classic way and ignore
``comfy_entrypoint``). Importing this file needs no ComfyUI; the algorithms in tomesd_ext/ are
shared with the diffusers adapter.

A ComfyUI older than OLDEST_COMFYUI has no ``comfy_api.v0_0_2`` (or no V3 entry points at all):
loaded there, the pack registers no nodes, does not raise, and logs one line naming the release
it needs.
"""

OLDEST_COMFYUI = "0.3.64"  # the oldest release the tests run the nodes on (pyproject requires-comfyui)


def _needs_newer_comfyui():
    """The line to log when this process is a ComfyUI without the V3 node API we use, else None."""
    import importlib.util
    import sys

    if "folder_paths" not in sys.modules:  # not loaded by ComfyUI (tests, a plain import)
        return None
    try:
        if importlib.util.find_spec("comfy_api.v0_0_2") is not None:
            return None
    except ImportError:  # no comfy_api package at all
        pass
    return (f"tomesd-ext: this ComfyUI has no V3 node API (comfy_api.v0_0_2); the nodes need ComfyUI "
            f"v{OLDEST_COMFYUI} or newer: update ComfyUI. No tomesd-ext nodes are loaded.")


_problem = _needs_newer_comfyui()
if _problem:
    import logging

    logging.getLogger("tomesd_ext").warning(_problem)


async def comfy_entrypoint():
    """Called by ComfyUI when it loads the pack: the extension listing our nodes."""
    from .nodes.v3 import TomesdExtExtension

    return TomesdExtExtension()


__all__ = ["comfy_entrypoint"]

"""diffusers adapter: apply_tome / remove_tome, and the peer policies on the same runtime
(apply_todo / remove_todo: ToDo K/V downsampling; apply_query_merge: ComfyUI-style queries-only
merging, removed with remove_tome; apply_vidtome / remove_vidtome: VidToMe temporal merging).

Modules: discovery (what to attach to), patching (how, reversibly), processors (the attention
wrappers), and one module per method (tome, importance, todo, vidtome)."""

try:
    import diffusers as _diffusers  # noqa: F401  (the library this adapter patches)
except ImportError as e:  # the core and the ComfyUI nodes need only torch: diffusers is an extra
    raise ImportError(
        "tomesd_ext's diffusers adapter (apply_tome, apply_todo, apply_vidtome, ...) needs diffusers, "
        "which is not installed: pip install \"tomesd-ext[diffusers]\" "
        f"(ComfyUI users need nothing more; the import failed with: {e})"
    ) from e

from .tome import apply_query_merge, apply_tome, remove_tome, tome_options, tome_schedule
from .todo import apply_todo, remove_todo
from .vidtome import apply_vidtome, remove_vidtome, vidtome_state

__all__ = [
    "apply_query_merge",
    "apply_todo",
    "apply_tome",
    "apply_vidtome",
    "remove_todo",
    "remove_tome",
    "remove_vidtome",
    "tome_options",
    "tome_schedule",
    "vidtome_state",
]

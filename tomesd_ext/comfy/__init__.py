"""ComfyUI adapter: token merging as ModelPatcher patches on a clone, on the shared core runtime.

``apply_tome_patch(model, ToMeOptions, start_percent, end_percent) -> (MODEL, warning or None)``;
``apply_importance_patch`` (mode="importance"); ``apply_vidtome_patch(model, VidToMeOptions, ...)``
(video frames = batch); ``remove_tome_patch(model)`` removes any tomesd-ext patch. Modules:
discovery (the UNet and its blocks), patching (clone, strip, the call wrapper), one per method.
ComfyUI modules are imported lazily, so this package imports without ComfyUI.
"""

from .importance import ImportanceMapHook, apply_importance_patch
from .patching import SUPPORTED, PatchState, remove_tome_patch, sigma_range, window_error
from .tome import apply_tome_patch
from .vidtome import apply_vidtome_patch

__all__ = [
    "SUPPORTED", "ImportanceMapHook", "PatchState", "apply_importance_patch", "apply_tome_patch",
    "apply_vidtome_patch", "remove_tome_patch", "sigma_range", "window_error",
]

"""ComfyUI adapter: ToMe as ModelPatcher patches that call the same core as the diffusers adapter.

``apply_tome_patch(model, ToMeOptions, start_percent, end_percent) -> (MODEL, warning or None)``;
``apply_importance_patch(model, opts)`` (mode="importance"); ``remove_tome_patch(model)`` (removes
any tomesd-ext patch); ``apply_vidtome_patch(model, VidToMeOptions, start_percent, end_percent)``
(video frames = batch). ComfyUI modules are imported lazily (inside functions), so this
package imports without ComfyUI (CI tests the patch functions on plain tensors).
"""

from .importance import ComfyImportanceState, apply_importance_patch
from .patch import SUPPORTED, apply_tome_patch, remove_tome_patch, sigma_range, window_error
from .state import ComfyToMeState
from .vidtome import apply_vidtome_patch

__all__ = [
    "SUPPORTED", "ComfyImportanceState", "ComfyToMeState", "apply_importance_patch", "apply_tome_patch",
    "apply_vidtome_patch", "remove_tome_patch", "sigma_range", "window_error",
]

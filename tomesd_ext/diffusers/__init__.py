"""diffusers adapter: apply_tome / remove_tome, apply_vidtome / remove_vidtome."""

from .patch import apply_tome, remove_tome, tome_options
from .vidtome import apply_vidtome, remove_vidtome, vidtome_state

__all__ = ["apply_tome", "remove_tome", "tome_options", "apply_vidtome", "remove_vidtome", "vidtome_state"]

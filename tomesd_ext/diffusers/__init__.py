"""diffusers adapter: apply_tome / remove_tome."""

from .patch import apply_tome, remove_tome, tome_options

__all__ = ["apply_tome", "remove_tome", "tome_options"]

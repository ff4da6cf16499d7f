"""diffusers adapter: apply_tome / remove_tome, and the peer policies on the same engine
(apply_todo / remove_todo: ToDo K/V downsampling; apply_query_merge: ComfyUI-style
queries-only merging, removed with remove_tome)."""

from .patch import apply_tome, remove_tome, tome_options
from .queries import apply_query_merge
from .todo import apply_todo, remove_todo

__all__ = ["apply_query_merge", "apply_todo", "apply_tome", "remove_todo", "remove_tome", "tome_options"]

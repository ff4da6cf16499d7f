"""Queries-only token merging, as ComfyUI's built-in TomePatchModel node (comfy_extras/nodes_tomesd.py) does it.

The same plan as apply_tome (window partition, cosine matching on norm1(x)), but only the
queries are merged: keys and values keep all N tokens, the output is unmerged. A peer for
benchmarks, on our engine; fixed to ComfyUI's settings (sx = sy = 2, d = 1 only).
Remove it with `remove_tome` (it is stored as an apply_tome patch, so either replaces the other).
"""

from __future__ import annotations

from ..core import ToMeOptions, merge, unmerge
from .patch import PATCH_ATTR, _Patch, install_patch
from .processors import MergedAttnProcessor


class QueryMergedAttnProcessor(MergedAttnProcessor):
    """Self-attention with merged queries: Q from merge(x) (B, N-r, C), K/V from x (B, N, C)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        mergeable = (
            self.self_attention
            and hidden_states.ndim == 3
            and attention_mask is None
            and encoder_hidden_states is None
        )
        plan = self.slot.get(hidden_states) if mergeable else None
        if plan is None or hidden_states.shape[1] != plan.n_tokens:
            return self.inner(
                attn, hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask, **kwargs
            )
        # K/V come from encoder_hidden_states when given; attn1 has no norm_cross, so passing
        # the full tokens there computes exactly the self-attention keys and values.
        out = self.inner(attn, merge(hidden_states, plan), encoder_hidden_states=hidden_states, **kwargs)
        return unmerge(out, plan)

    def __repr__(self):
        return f"QueryMergedAttnProcessor({self.inner!r})"


class _QueryPatch(_Patch):
    processor_class = QueryMergedAttnProcessor


def apply_query_merge(pipe_or_model, ratio: float = 0.3, *, seed=None, max_downsample=1, min_tokens=0):
    """Patch in place with queries-only merging (ComfyUI built-in style); returns the argument.

    ratio in [0, 0.75]; max_downsample 1 as in ComfyUI (SDXL then merges nothing, like the
    original). `remove_tome` undoes it.
    """
    opts = ToMeOptions.create(ratio=ratio, seed=seed, max_downsample=max_downsample, min_tokens=min_tokens)
    return install_patch(pipe_or_model, PATCH_ATTR, lambda model: _QueryPatch(model, opts))

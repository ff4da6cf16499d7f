"""An attention processor that merges tokens around whatever processor was set before.

It wraps SDPA, xformers, IP-Adapter or custom processors alike: queries (and, for
self-attention, keys and values) come from the merged tokens; the output is unmerged.
"""

from __future__ import annotations

import inspect

from ..core import merge, unmerge
from .state import BlockSlot


def expose_signature(wrapper, inner) -> None:
    """Give `wrapper.__call__` the signature of `inner.__call__`.

    diffusers filters cross_attention_kwargs by inspecting `processor.__call__`: with the inner
    processor's signature exactly the same keys reach it as without the wrapper.
    """
    try:
        signature = inspect.signature(inner.__call__)
    except (TypeError, ValueError):
        return

    def introspected(*args, **kwargs):
        return wrapper(*args, **kwargs)

    introspected.__signature__ = signature
    wrapper.__call__ = introspected


class MergedAttnProcessor:
    """Wraps `inner`; `self_attention` says whether K/V come from hidden_states (attn1)."""

    def __init__(self, inner, slot: BlockSlot, self_attention: bool):
        self.inner = inner
        self.slot = slot
        self.self_attention = self_attention
        expose_signature(self, inner)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        mergeable = hidden_states.ndim == 3 and not (
            self.self_attention and (attention_mask is not None or encoder_hidden_states is not None)
        )
        plan = self.slot.get(hidden_states) if mergeable else None
        if plan is None or hidden_states.shape[1] != plan.n_tokens:
            return self.inner(
                attn, hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask, **kwargs
            )
        out = self.inner(
            attn, merge(hidden_states, plan), encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask, **kwargs
        )
        return unmerge(out, plan)

    def __repr__(self):
        return f"MergedAttnProcessor({self.inner!r})"

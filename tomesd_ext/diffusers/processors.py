"""Attention processors that wrap whatever processor was set before (SDPA, xformers, IP-Adapter,
custom ones) and call the core at one attention: ToMe/importance merging, ToDo, VidToMe.

Each wrapper calls its ``inner`` processor with the inputs changed by the core (fewer tokens) and,
where it merged, unmerges the output; anything it does not merge (a mask, another sequence
length, a level that is not merged) goes to ``inner`` unchanged.
"""

from __future__ import annotations

import inspect

from ..core import BlockSlot, merge, unmerge


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


class WrappedProcessor:
    """Base: holds ``inner`` and passes a call through unchanged (``passthrough``)."""

    def __init__(self, inner):
        self.inner = inner
        expose_signature(self, inner)

    def passthrough(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        return self.inner(
            attn, hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask, **kwargs
        )

    def __repr__(self):
        return f"{type(self).__name__}({self.inner!r})"


class MergedAttnProcessor(WrappedProcessor):
    """ToMe around one attention: queries (and, for self-attention, keys and values) from the
    merged tokens (B, N-r, C), output unmerged to (B, N, C). queries_only: keys and values keep
    all N tokens (ComfyUI's built-in ToMe). The plan comes from the block's ``slot``."""

    def __init__(self, inner, slot: BlockSlot, self_attention: bool, queries_only: bool = False):
        super().__init__(inner)
        self.slot = slot
        self.self_attention = self_attention
        self.queries_only = queries_only

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        own_kv = attention_mask is None and encoder_hidden_states is None
        if self.queries_only:
            mergeable = self.self_attention and hidden_states.ndim == 3 and own_kv
        else:
            mergeable = hidden_states.ndim == 3 and not (self.self_attention and not own_kv)
        plan = self.slot.get(hidden_states) if mergeable else None
        if plan is None:
            return self.passthrough(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)
        if self.queries_only:
            # K/V come from encoder_hidden_states when given; attn1 has no norm_cross, so passing
            # the full tokens there computes exactly the self-attention keys and values.
            out = self.inner(attn, merge(hidden_states, plan), encoder_hidden_states=hidden_states, **kwargs)
        else:
            out = self.inner(
                attn, merge(hidden_states, plan), encoder_hidden_states=encoder_hidden_states,
                attention_mask=attention_mask, **kwargs,
            )
        return unmerge(out, plan)


class ToDoAttnProcessor(WrappedProcessor):
    """ToDo self-attention: K/V from the downsampled grid (B, N/f^2, C), queries and output (B, N, C)."""

    def __init__(self, inner, runtime):
        super().__init__(inner)
        self.runtime = runtime

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        rt = self.runtime
        grid = None
        if hidden_states.ndim == 3 and encoder_hidden_states is None and attention_mask is None and rt.opts.factor > 1:
            grid = rt.level(hidden_states.shape[1])
        if grid is None:
            return self.passthrough(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)
        kv = rt.policy.keys_values(hidden_states, grid)
        return self.inner(attn, hidden_states, encoder_hidden_states=kv, **kwargs)


class VidToMeAttnProcessor(WrappedProcessor):
    """VidToMe self-attention of one block across the frames of a chunk call (S*F, N, C)."""

    def __init__(self, inner, runtime, block_id: int):
        super().__init__(inner)
        self.runtime = runtime
        self.block_id = block_id

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        rt = self.runtime
        if (
            rt.policy.draw is None
            or hidden_states.ndim != 3
            or encoder_hidden_states is not None
            or attention_mask is not None
            or rt.level(hidden_states.shape[1]) is None
        ):
            return self.passthrough(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)

        def run(tokens):
            return self.inner(attn, tokens, encoder_hidden_states=None, attention_mask=None, **kwargs)

        return rt.policy.attention(self.block_id, hidden_states, run)

"""Attention processors that wrap whatever processor was set before (SDPA, xformers, IP-Adapter,
custom ones) and call the core at one attention: ToMe/importance merging, ToDo, VidToMe.

Each wrapper calls its ``inner`` processor with the inputs changed by the core (fewer tokens) and,
where it merged, unmerges the output; anything it does not merge (a mask, another sequence
length, a level that is not merged) goes to ``inner`` unchanged.
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch

from ..core import BlockSlot, merge, unmerge


def default_processor():
    """diffusers' default attention processor (SDPA)."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    return AttnProcessor2_0()


def _call_signature(inner) -> inspect.Signature:
    """The signature of ``inner.__call__`` with a leading ``self`` (the signature of an unbound
    ``__call__`` whose bound method looks like the inner processor's)."""
    try:
        sig = inspect.signature(inner.__call__)
    except (TypeError, ValueError):
        sig = inspect.signature(WrappedProcessor.forward)
        return sig
    this = inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)
    return sig.replace(parameters=[this, *sig.parameters.values()])


_SIGNED = {}  # (wrapper class, inner processor class) -> the wrapper's subclass with that signature


def _signed_class(cls, inner):
    """``cls`` with a ``__call__`` that has the signature of ``inner``'s (one subclass per pair).

    diffusers filters ``cross_attention_kwargs`` by ``inspect.signature(processor.__call__)``, so
    exactly the keys the inner processor takes reach it. The signature lives on the class (not the
    instance) so that torch.compile traces the call without a graph break."""
    cls = getattr(cls, "_unsigned", cls)
    key = (cls, type(inner))
    if key not in _SIGNED:
        def __call__(self, *args, **kwargs):
            return self.forward(*args, **kwargs)

        __call__.__signature__ = _call_signature(inner)
        _SIGNED[key] = type(cls.__name__, (cls,), {
            "__call__": __call__, "_unsigned": cls, "__module__": cls.__module__, "__qualname__": cls.__qualname__,
        })
    return _SIGNED[key]


def _rebuild(cls, inner):
    return object.__new__(_signed_class(cls, inner))


class WrappedProcessor:
    """Base: holds ``inner`` and passes a call through unchanged (``passthrough``).

    To diffusers the wrapper looks like the processor it wraps: ``__class__`` is the inner
    processor's class (an nn.Module processor's attributes are reached through the wrapper too) (``set_default_attn_processor``, ``fuse_qkv_projections`` and the IP-Adapter
    loader inspect and rebuild processors by class) and ``__call__`` has its signature. ``type()``
    is the wrapper's. Constructed without arguments (diffusers' ``processor.__class__()``), it wraps
    the default processor and merges nothing. Copies and pickles with the model.
    """

    def __new__(cls, inner=None, *args, **kwargs):
        return object.__new__(_signed_class(cls, inner if inner is not None else default_processor()))

    def __init__(self, inner=None):
        self.inner = inner if inner is not None else default_processor()

    def __call__(self, *args, **kwargs):  # replaced by the signed subclass's (same body)
        return self.forward(*args, **kwargs)

    @property
    def __class__(self):
        inner = self.__dict__.get("inner")
        return type(self) if inner is None else inner.__class__

    def __getattr__(self, name):
        # An nn.Module processor (IP-Adapter, Custom Diffusion) is stood in for completely: torch
        # and diffusers see its parameters, state_dict and submodules through the wrapper.
        inner = self.__dict__.get("inner")
        if inner is None or not isinstance(inner, torch.nn.Module) or (name.startswith("__") and name.endswith("__")):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(inner, name)

    def __reduce_ex__(self, protocol):
        return _rebuild, (type(self)._unsigned, self.inner), self.__dict__

    def forward(self, attn, hidden_states, *args, **kwargs):
        return self.inner(attn, hidden_states, *args, **kwargs)

    def passthrough(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        return self.inner(
            attn, hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask, **kwargs
        )

    def __repr__(self):
        return f"{type(self).__name__}({self.inner!r})"


def wrapped_chain(processor):
    """The processors of a chain of wrappers, outermost first (ending with the innermost one)."""
    chain = [processor]
    while isinstance(chain[-1], WrappedProcessor):
        chain.append(chain[-1].inner)
    return chain


class MergedAttnProcessor(WrappedProcessor):
    """ToMe around one attention: queries (and, for self-attention, keys and values) from the
    merged tokens (B, N-r, C), output unmerged to (B, N, C). queries_only: keys and values keep
    all N tokens (ComfyUI's built-in ToMe). The plan comes from the block's ``slot``."""

    def __init__(self, inner=None, slot: Optional[BlockSlot] = None, self_attention: bool = True, queries_only: bool = False):
        super().__init__(inner)
        self.slot = slot
        self.self_attention = self_attention
        self.queries_only = queries_only

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        own_kv = attention_mask is None and encoder_hidden_states is None
        if self.queries_only:
            mergeable = self.self_attention and hidden_states.ndim == 3 and own_kv
        else:
            mergeable = hidden_states.ndim == 3 and not (self.self_attention and not own_kv)
        plan = self.slot.get(hidden_states) if mergeable and self.slot is not None else None
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

    def __init__(self, inner=None, runtime=None):
        super().__init__(inner)
        self.runtime = runtime

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        rt = self.runtime
        grid = None
        if rt is not None and hidden_states.ndim == 3 and encoder_hidden_states is None and attention_mask is None and rt.opts.factor > 1:
            grid = rt.level(hidden_states.shape[1])
        if grid is None:
            return self.passthrough(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)
        kv = rt.policy.keys_values(hidden_states, grid)
        return self.inner(attn, hidden_states, encoder_hidden_states=kv, **kwargs)


class VidToMeAttnProcessor(WrappedProcessor):
    """VidToMe self-attention of one block across the frames of a chunk call (S*F, N, C)."""

    def __init__(self, inner=None, runtime=None, block_id: int = 0):
        super().__init__(inner)
        self.runtime = runtime
        self.block_id = block_id

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        rt = self.runtime
        if (
            rt is None
            or rt.policy.draw is None
            or hidden_states.ndim != 3
            or encoder_hidden_states is not None
            or attention_mask is not None
            or rt.level(hidden_states.shape[1]) is None
        ):
            return self.passthrough(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)

        def run(tokens):
            return self.inner(attn, tokens, encoder_hidden_states=None, attention_mask=None, **kwargs)

        return rt.policy.attention(self.block_id, hidden_states, run)

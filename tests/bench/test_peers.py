"""The peer policies on our engine: queries-only merging and ToDo K/V downsampling."""

import pytest
import torch

from tomesd_ext.core import OptionError, ToDoOptions, downsample_tokens, downsampled_size
from tomesd_ext.diffusers import apply_query_merge, apply_todo, apply_tome, remove_todo, remove_tome
from tomesd_ext.diffusers.processors import MergedAttnProcessor, ToDoAttnProcessor


def _run(unet, inputs):
    x, t, c = inputs
    with torch.no_grad():
        return unet(x, t, c).sample


class _Recorder:
    """Inner processor stand-in: records query and key/value lengths, then runs the real one."""

    def __init__(self, inner, log):
        self.inner, self.log = inner, log

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kw):
        kv = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        self.log.append((hidden_states.shape[1], kv.shape[1]))
        return self.inner(attn, hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask, **kw)


def _wrappers(unet, cls):
    return [m.processor for m in unet.modules() if isinstance(getattr(m, "processor", None), cls)]


def _record(unet, cls):
    log, wrappers = [], _wrappers(unet, cls)
    assert wrappers
    for w in wrappers:
        w.inner = _Recorder(w.inner, log)
    return log


def test_downsample_tokens_matches_strided_grid():
    x = torch.arange(2 * 8 * 6 * 3, dtype=torch.float32).view(2, 8 * 6, 3)
    y = downsample_tokens(x, 8, 6, 2)
    expected = x.view(2, 8, 6, 3)[:, ::2, ::2].reshape(2, -1, 3)
    assert torch.equal(y, expected)


def test_downsample_tokens_odd_grid_keeps_edges_and_factor_one_is_identity():
    x = torch.randn(1, 5 * 7, 4)
    y = downsample_tokens(x, 5, 7, 2)
    assert downsampled_size(5, 7, 2) == (3, 4)
    rows, cols = [0, 1, 3], [0, 1, 3, 5]  # nearest: floor(i * 5/3), floor(j * 7/4)
    assert torch.equal(y, x.view(1, 5, 7, 4)[:, rows][:, :, cols].reshape(1, 12, 4))
    assert downsample_tokens(x, 5, 7, 1) is x
    with pytest.raises(ValueError, match="grid"):
        downsample_tokens(x, 5, 6, 2)


@pytest.mark.parametrize("kwargs, match", [({"factor": 0}, "factor"), ({"factor": 9}, "factor"), ({"mode": "bilinear"}, "mode"), ({"max_downsample": 3}, "max_downsample"), ({"foo": 1}, "unknown")])
def test_todo_options_are_validated(kwargs, match):
    with pytest.raises(OptionError, match=match):
        ToDoOptions.create(**kwargs)


def test_query_merge_merges_only_queries(tiny_unet, tiny_inputs):
    ref = _run(tiny_unet, tiny_inputs)
    apply_query_merge(tiny_unet, 0.5, seed=0)
    log = _record(tiny_unet, MergedAttnProcessor)
    assert all(p.queries_only for p in _wrappers(tiny_unet, MergedAttnProcessor))
    out = _run(tiny_unet, tiny_inputs)
    remove_tome(tiny_unet)
    n = 16 * 16
    merged = [(q, kv) for q, kv in log if kv == n]
    assert merged and all(q == n // 2 for q, _ in merged)  # queries halved, K/V full
    assert all(kv == q for q, kv in log if kv != n)  # other levels untouched
    assert not torch.equal(out, ref)
    assert torch.equal(_run(tiny_unet, tiny_inputs), ref)


def test_query_merge_ratio_zero_is_exact(tiny_unet, tiny_inputs):
    ref = _run(tiny_unet, tiny_inputs)
    apply_query_merge(tiny_unet, 0.0, seed=0)
    try:
        assert torch.equal(_run(tiny_unet, tiny_inputs), ref)
    finally:
        remove_tome(tiny_unet)


def test_todo_downsamples_keys_and_values(tiny_unet, tiny_inputs):
    ref = _run(tiny_unet, tiny_inputs)
    apply_todo(tiny_unet, factor=2)
    log = _record(tiny_unet, ToDoAttnProcessor)
    out = _run(tiny_unet, tiny_inputs)
    remove_todo(tiny_unet)
    n = 16 * 16
    assert (n, n // 4) in log  # queries whole, K/V from the 8x8 grid
    assert all(q == kv for q, kv in log if q != n)  # coarser levels untouched ("auto" = d 1)
    assert not torch.equal(out, ref)
    assert torch.equal(_run(tiny_unet, tiny_inputs), ref)


def test_todo_factor_one_is_exact_and_reapply_replaces(tiny_unet, tiny_inputs):
    ref = _run(tiny_unet, tiny_inputs)
    apply_todo(tiny_unet, factor=3)
    apply_todo(tiny_unet, factor=1)  # replaces, does not stack
    try:
        assert torch.equal(_run(tiny_unet, tiny_inputs), ref)
        assert not any(isinstance(getattr(m, "processor", None), ToDoAttnProcessor) and isinstance(m.processor.inner, ToDoAttnProcessor) for m in tiny_unet.modules())
    finally:
        remove_todo(tiny_unet)
    assert not any(isinstance(getattr(m, "processor", None), ToDoAttnProcessor) for m in tiny_unet.modules())


def test_query_merge_and_tome_replace_each_other(tiny_unet, tiny_inputs):
    ref = _run(tiny_unet, tiny_inputs)
    apply_query_merge(tiny_unet, 0.5, seed=0)
    apply_tome(tiny_unet, 0.0, seed=0)
    assert not any(getattr(getattr(m, "processor", None), "queries_only", False) for m in tiny_unet.modules())
    assert torch.equal(_run(tiny_unet, tiny_inputs), ref)
    remove_tome(tiny_unet)

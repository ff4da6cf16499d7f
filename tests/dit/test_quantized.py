"""apply_tome on quantized transformers, as most people run Flux and Wan: GGUF single files through
diffusers' ``GGUFQuantizationConfig`` (Flux.1, Wan 2.1; random-weight files written here, in the
original single-file layouts, Q8_0 and Q4_K) and torchao int8 weight-only (diffusers'
``TorchAoConfig``, and torchao's own ``quantize_``).

Each model: merging is on (the token counts at torch's SDPA drop: queries in block and attn mode,
keys and values in kv mode), ratio 0 is bit-identical to the quantized model alone, remove_tome is
exact, the state dict (keys, tensor types, quant types, stored values) is that of the unpatched model
while patched, and saving behaves as without the patch (GGUF: diffusers refuses to save a
GGUF-quantized model, ``is_serializable`` False, with or without the patch; torchao: the patched
model saves what the unpatched one saves and both reload to the same outputs).
"""

from contextlib import contextmanager

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from tomesd_ext import apply_tome, remove_tome

from .dit_models import _flux_ids, make, make_video

MODES = ("block", "attn", "kv")


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def run(m, kw):
    with torch.no_grad():
        return m(**kw).sample


@contextmanager
def sdpa_lengths():
    """(query length, key length) of every scaled_dot_product_attention call inside."""
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    class Spy(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is sdpa:
                q, k = kwargs.get("query", args[0] if args else None), kwargs.get("key", args[1] if len(args) > 1 else None)
                seen.append((q.shape[-2], k.shape[-2]))
            return func(*args, **kwargs)

    with Spy():
        yield seen


def _raw(v):
    """A state-dict value as plain tensors: a GGUFParameter's bytes, a torchao tensor's inner tensors."""
    if hasattr(v, "as_tensor"):  # GGUFParameter
        return [v.as_tensor()]
    if hasattr(v, "__tensor_flatten__"):
        names, _ctx = v.__tensor_flatten__()
        return [t for n in names for t in _raw(getattr(v, n))]
    return [v.detach()]


def snapshot(m):
    return {k: (type(v), getattr(v, "quant_type", None), v.dtype, tuple(v.shape), [t.clone() for t in _raw(v)])
            for k, v in m.state_dict().items()}


def same_state(m, snap) -> bool:
    now = m.state_dict()
    if list(now) != list(snap):
        return False
    for k, v in now.items():
        cls, qt, dtype, shape, raw = snap[k]
        if (type(v), getattr(v, "quant_type", None), v.dtype, tuple(v.shape)) != (cls, qt, dtype, shape):
            return False
        if not all(torch.equal(a, b) for a, b in zip(_raw(v), raw)):
            return False
    return True


def check_merging(m, kw, expected, zero_modes=MODES, modes=MODES):
    """The checks every quantized model gets; ``expected[mode]``: the SDPA (query, key) lengths of a
    merged call at ratio 0.5. Returns the unpatched output."""
    snap = snapshot(m)
    with sdpa_lengths() as seen:
        ref = run(m, kw)
    unmerged = list(seen)
    for mode in zero_modes:
        apply_tome(m, 0.0, dit_mode=mode, seed=3, min_tokens=0)
        assert torch.equal(run(m, kw), ref), mode
    for mode in modes:
        apply_tome(m, 0.5, dit_mode=mode, seed=3, min_tokens=0)
        with sdpa_lengths() as seen:
            out = run(m, kw)
        assert seen == expected[mode] != unmerged, (mode, seen)
        assert out.shape == ref.shape and torch.isfinite(out).all() and 0 < rel(out, ref) < 0.5, mode
        assert same_state(m, snap), mode
    remove_tome(m)
    assert torch.equal(run(m, kw), ref) and same_state(m, snap)
    return ref


# GGUF ---------------------------------------------------------------------------------------------


def _gguf_model(which):
    pytest.importorskip("gguf", reason="GGUF checks need the gguf package (the dev extra installs it)")
    from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig, WanTransformer3DModel

    from .gguf_files import cached_model

    path, config = cached_model(which)  # written once (the Flux file: 0.3 GB, ~40 s on 2 loaded cores)
    cls = FluxTransformer2DModel if which == "flux" else WanTransformer3DModel
    return cls.from_single_file(path, config=config, local_files_only=True,
                                quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32))


def _quant_types(m):
    from diffusers.quantizers.gguf.utils import GGUFLinear

    return {type(mod.weight).__name__ + ":" + mod.weight.quant_type.name for mod in m.modules() if isinstance(mod, GGUFLinear)
            and hasattr(mod.weight, "quant_type")}


def _save_refused_alike(m, tmp_path):
    """diffusers does not save GGUF-quantized models (GGUFQuantizer.is_serializable is False): the
    patched model is refused with the same error as the unpatched one."""
    errors = []
    for patched in (False, True):
        if patched:
            apply_tome(m, 0.5, seed=0, min_tokens=0)
        with pytest.raises(ValueError, match="not serializable") as caught:
            m.save_pretrained(tmp_path / f"save-{patched}")
        errors.append(str(caught.value))
    remove_tome(m)
    assert errors[0] == errors[1]


def test_q4_k_files_read_back_as_written():
    gguf = pytest.importorskip("gguf", reason="GGUF checks need the gguf package (the dev extra installs it)")
    from diffusers.quantizers.gguf.utils import GGUFParameter, dequantize_gguf_tensor

    from .gguf_files import quantize_q4_k

    x = torch.randn(6, 512, generator=torch.Generator().manual_seed(0)).numpy() * 0.05
    blocks = quantize_q4_k(x)
    back = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q4_K)
    assert blocks.shape == (6, 2 * 144) and np.abs(back - x).max() < 0.1 * np.abs(x).max()
    ours = dequantize_gguf_tensor(GGUFParameter(torch.from_numpy(blocks), quant_type=gguf.GGMLQuantizationType.Q4_K))
    assert np.abs(ours.float().numpy() - back).max() < 4e-3 * np.abs(x).max()  # diffusers dequantizes Q4_K in fp16


@pytest.fixture(scope="module")
def wan_gguf():
    return _gguf_model("wan")


@pytest.fixture(scope="module")
def flux_gguf():
    return _gguf_model("flux")


def test_wan_gguf_single_file(wan_gguf, tmp_path):
    m = wan_gguf
    assert _quant_types(m) == {"GGUFParameter:Q8_0", "GGUFParameter:Q4_K"}
    g = torch.Generator().manual_seed(1)  # 3 latent frames of 12 x 10: 3 x 6 x 5 tokens, 7 text tokens
    kw = dict(hidden_states=torch.randn(1, 16, 3, 12, 10, generator=g), timestep=torch.tensor([500.0]),
              encoder_hidden_states=torch.randn(1, 7, 256, generator=g))
    n, kept, txt = 90, 45, 7
    expected = {  # per block: self-attention, then cross-attention to the text
        "block": [(kept, kept), (kept, txt)] * 2,
        "attn": [(kept, kept), (n, txt)] * 2,
        "kv": [(n, kept), (n, txt)] * 2,
    }
    check_merging(m, kw, expected)
    _save_refused_alike(m, tmp_path)


@pytest.mark.slow
def test_flux_gguf_single_file(flux_gguf, tmp_path):
    # diffusers' Flux single-file converter splits linear1 at inner_dim 3072: the real width, one
    # double and one single block (about 0.5 B parameters, 0.3 GB as Q8_0/Q4_K)
    m = flux_gguf
    assert _quant_types(m) == {"GGUFParameter:Q8_0", "GGUFParameter:Q4_K"}
    h, w, txt = 8, 8, 4
    g = torch.Generator().manual_seed(1)
    kw = dict(hidden_states=torch.randn(1, h * w, 64, generator=g), encoder_hidden_states=torch.randn(1, txt, 256, generator=g),
              pooled_projections=torch.randn(1, 256, generator=g), timestep=torch.tensor([0.5]), img_ids=_flux_ids(h, w, 3),
              txt_ids=torch.zeros(txt, 3), guidance=torch.tensor([3.5]))
    n, kept = h * w, h * w // 2
    expected = {  # the double block's joint attention, then the single block's: text + image
        "block": [(txt + kept, txt + kept)] * 2,
        "attn": [(txt + kept, txt + kept)] * 2,
        "kv": [(txt + n, txt + kept)] * 2,
    }
    check_merging(m, kw, expected, zero_modes=("block",))  # about 3 s a forward on 2 cores: one ratio-0 run
    _save_refused_alike(m, tmp_path)


# torchao ------------------------------------------------------------------------------------------


def _int8_config():
    pytest.importorskip("torchao", reason="torchao checks need torchao (the dev extra installs it)")
    from torchao.quantization import Int8WeightOnlyConfig

    return Int8WeightOnlyConfig()


def _int8_weights(m) -> int:
    return sum(type(mod.weight).__module__.startswith("torchao") for mod in m.modules() if isinstance(mod, torch.nn.Linear))


def test_flux_torchao_int8_weight_only_through_diffusers(tmp_path):
    from diffusers import FluxTransformer2DModel, TorchAoConfig

    config = TorchAoConfig(_int8_config())
    with pytest.raises(TypeError, match="AOBaseConfig"):  # diffusers 0.42: a torchao config object, no string form
        TorchAoConfig("int8_weight_only")
    base, kw, _ = make("flux", batch=1, h=12, w=10)
    base.save_pretrained(tmp_path / "plain")
    m = FluxTransformer2DModel.from_pretrained(tmp_path / "plain", quantization_config=config, torch_dtype=torch.bfloat16)
    assert _int8_weights(m) > 20
    kw = {k: v.to(torch.bfloat16) if v.is_floating_point() and k not in ("img_ids", "txt_ids") else v for k, v in kw.items()}
    n, kept, txt = 120, 60, 7
    expected = {
        "block": [(txt + kept, txt + kept)] * 4,
        "attn": [(txt + kept, txt + kept)] * 4,
        "kv": [(txt + n, txt + kept)] * 4,
    }
    ref = check_merging(m, kw, expected)

    # saving: the patched model writes what the unpatched one writes; both reload to its output
    m.save_pretrained(tmp_path / "unpatched", safe_serialization=False)
    apply_tome(m, 0.5, seed=0, min_tokens=0)
    m.save_pretrained(tmp_path / "patched", safe_serialization=False)
    remove_tome(m)
    for name in ("unpatched", "patched"):
        again = FluxTransformer2DModel.from_pretrained(tmp_path / name, torch_dtype=torch.bfloat16)
        assert _int8_weights(again) == _int8_weights(m) and not hasattr(again, "_tomesd_ext_patch")
        assert torch.equal(run(again, kw), ref)


def test_wan_torchao_quantize_int8_weight_only():
    config = _int8_config()
    from torchao.quantization import quantize_

    m, kw, _ = make_video("wan", batch=1, frames=3, h=6, w=5)
    quantize_(m, config)
    assert _int8_weights(m) > 10
    n, kept, txt = 90, 45, 7
    expected = {
        "block": [(kept, kept), (kept, txt)] * 2,
        "attn": [(kept, kept), (n, txt)] * 2,
        "kv": [(n, kept), (n, txt)] * 2,
    }
    check_merging(m, kw, expected)

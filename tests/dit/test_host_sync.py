"""No host synchronisation inside a merged forward, on every family and mode (diffusers adapter).

On a GPU every read of a device tensor's value by the host (``.item()``, ``int(t)``, ``.tolist()``,
``.cpu()``), every data-dependent shape (``nonzero``, boolean indexing, ``masked_select``,
``unique``) makes the host wait for the device. A dispatch mode counts them on tiny CPU models
(``.tolist()``/``.numpy()``/``.cpu()`` do not dispatch, so they are counted by wrapping them),
each attributed to a transformer block when one is running. The rule: none inside blocks, and at
most one per denoiser call outside them (the timestep read that keys the step's partition; in
importance mode it also carries the CFG-layout check) once a run has started; the first call may
read its position ids once more (a pipeline passes the same ids at every step). A timestep given
as a Python number (and, in importance mode, a fixed cfg_layout) reads nothing.
"""

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tomesd_ext import apply_tome, remove_tome
from tomesd_ext.models import build_unet

from .dit_models import FAMILIES, VIDEO_FAMILIES, cfg_batch, make, make_video

SYNC_OPS = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten._unique", "aten.unique",
            "aten.item", "aten.is_nonzero", "aten.equal")
IMPORTANCE_FAMILIES = ("sd3", "pixart", "qwen-image", "z-image")  # the CFG-guided image families


class SyncCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.depth = 0  # > 0 while a transformer block runs
        self.inside, self.outside = [], []

    def note(self, what):
        (self.inside if self.depth else self.outside).append(what)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket._qualified_op_name).replace("::", ".")
        if name.startswith(SYNC_OPS):
            self.note(name)
        elif name == "aten.index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                          for i in (args[1] if len(args) > 1 else ())):
            self.note("boolean indexing")
        elif name == "aten.repeat_interleave" and kwargs.get("output_size") is None and len(args) == 1:
            self.note("repeat_interleave without output_size")
        return func(*args, **kwargs)


def _blocks(model):
    return [m for m in model.modules() if type(m).__name__.endswith(("TransformerBlock", "SingleTransformerBlock"))]


@contextlib.contextmanager
def counting(model):
    counter = SyncCounter()
    hooks = []

    def enter(*_):
        counter.depth += 1

    def leave(*_):
        counter.depth -= 1

    for block in _blocks(model):
        hooks.append(block.register_forward_pre_hook(enter))
        hooks.append(block.register_forward_hook(leave))
    assert hooks, f"no transformer blocks found in {type(model).__name__}"
    wrapped = {}
    for attr in ("tolist", "numpy", "cpu"):
        original = getattr(torch.Tensor, attr)

        def reader(self, *a, _original=original, _attr=attr, **k):
            counter.note(f".{_attr}()")
            return _original(self, *a, **k)

        wrapped[attr] = original
        setattr(torch.Tensor, attr, reader)
    try:
        with counter:
            yield counter
    finally:
        for attr, original in wrapped.items():
            setattr(torch.Tensor, attr, original)
        for h in hooks:
            h.remove()


def _steps(model, calls, time_key):
    """Run ``calls`` (kwargs) as consecutive steps (timestep scaled each step); the counters of each."""
    seen = []
    for i, kw in enumerate(calls):
        kw = dict(kw)
        kw[time_key] = kw[time_key] * (1.0 - 0.1 * i)
        with counting(model) as c, torch.no_grad():
            model(**kw)
        seen.append(c)
    return seen


def _check(counters, unpatched):
    for step, c in enumerate(counters):
        assert c.inside == [], f"step {step}: host reads inside blocks: {c.inside}"
        allowed = len(unpatched.outside) + (2 if step == 0 else 1)
        assert len(c.outside) <= allowed, f"step {step}: {c.outside} (unpatched: {unpatched.outside})"


def _unpatched(model, kw, time_key):
    (c,) = _steps(model, [kw], time_key)
    assert c.inside == [], f"the unpatched model reads in blocks itself: {c.inside}"
    return c


def _time_key(kw):
    return "t" if "t" in kw else "timestep"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["block", "attn", "kv"])
def test_image_transformers_do_not_sync_in_blocks(family, mode):
    m, kw, _ = make(family, batch=2, h=8, w=8)
    key = _time_key(kw)
    base = _unpatched(m, kw, key)
    apply_tome(m, 0.5, seed=0, min_tokens=0, dit_mode=mode)
    _check(_steps(m, [kw] * 3, key), base)
    remove_tome(m)


@pytest.mark.parametrize("family", IMPORTANCE_FAMILIES)
def test_importance_mode_does_not_sync_in_blocks(family):
    m, kw, _ = make(family, batch=1, h=8, w=8)
    cfg = cfg_batch(kw)
    key = _time_key(cfg)
    base = _unpatched(m, cfg, key)
    apply_tome(m, 0.5, seed=0, min_tokens=0, mode="importance")
    counters = _steps(m, [cfg] * 3, key)  # from the 2nd step the map of the previous one merges
    assert m._tomesd_ext_patch.policy.counts["importance"] > 0
    _check(counters, base)
    remove_tome(m)


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
@pytest.mark.parametrize("mode", ["tome", "importance"])
def test_video_transformers_do_not_sync_in_blocks(family, mode):
    m, kw, _ = make_video(family, batch=1, frames=5, h=6, w=6)
    if mode == "importance":
        kw = cfg_batch(kw)
    key = _time_key(kw)
    base = _unpatched(m, kw, key)
    apply_tome(m, 0.5, seed=0, min_tokens=0, mode=mode)
    _check(_steps(m, [kw] * 3, key), base)
    remove_tome(m)


def _tiny_unet_cfg_call():
    """The tiny SD-topology UNet and a CFG call of it (one latent twice, 48x48: 2304 tokens at d=1)."""
    unet = build_unet("tiny", seed=0).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 48, 48, generator=g)
    return unet, {"sample": torch.cat([x, x]), "timestep": torch.tensor(500.0),
                  "encoder_hidden_states": torch.randn(2, 7, unet.config.cross_attention_dim, generator=g)}


@pytest.mark.parametrize("mode", ["tome", "importance"])
def test_unet_does_not_sync_in_blocks(mode):
    unet, kw = _tiny_unet_cfg_call()
    base = _unpatched(unet, kw, "timestep")
    apply_tome(unet, 0.5, seed=0, min_tokens=0, mode=mode)
    _check(_steps(unet, [kw] * 3, "timestep"), base)
    remove_tome(unet)


@pytest.mark.parametrize("mode", ["tome", "importance"])
def test_timestep_as_a_python_number_reads_nothing(mode):
    unet, kw = _tiny_unet_cfg_call()
    apply_tome(unet, 0.5, seed=0, min_tokens=0, mode=mode, cfg_layout="halves" if mode == "importance" else "auto")
    for t in (900, 800, 700):
        with counting(unet) as c, torch.no_grad():
            unet(**dict(kw, timestep=t))
        assert c.inside == [] and c.outside == [], (t, c.outside)
    remove_tome(unet)


def test_the_counter_sees_what_it_must():
    """The instrument itself: a read inside a block and one outside are both caught."""
    m, kw, _ = make("sd3", batch=2, h=8, w=8)
    block = _blocks(m)[0]
    with counting(m) as c, torch.no_grad():
        def read(mod, args, kwargs):  # after counting's own hook: inside the block
            int((args[0] if args else kwargs["hidden_states"]).sum())

        hook = block.register_forward_pre_hook(read, with_kwargs=True)
        kw["timestep"].tolist()
        m(**kw)
    hook.remove()
    assert c.inside == ["aten._local_scalar_dense"] and ".tolist()" in c.outside

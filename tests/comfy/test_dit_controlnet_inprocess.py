"""ComfyUI's ControlNet on Flux with our DiT merging (tiny Flux of dit_models, ComfyUI's own class).

A ControlNet's output reaches Flux as the ``control`` argument of ``apply_model`` (what
ComfyUI's sampler passes from "Apply ControlNet"); Flux's forward adds ``control["input"][i]``
to the image tokens after double block i and ``control["output"][i]`` to the image span of
[text, image] after single block i, in place, on what the block (or its ``patches_replace``
entry) handed back. Our entries hand back the full-length token sequence (block mode: the block
ran on merged tokens, its update unmerged; kv mode: the block ran whole), so the residuals land
on every image token: shown by recording what each block hands back and what the next block (or
the final layer) receives. dit_mode "attn" is refused in ComfyUI (test_dit_inprocess.py).
"""

import pytest
import torch

from comfy_env import import_comfy, tome_node
from dit_models import comfy_from_diffusers, inputs, recorded_plans, run_dit, tiny_diffusers

pytestmark = pytest.mark.comfyui

SIGMA = 0.7
BLOCKS = [("double_block", 0), ("double_block", 1), ("single_block", 0), ("single_block", 1)]


@pytest.fixture(scope="module")
def flux():
    import_comfy()
    return comfy_from_diffusers(tiny_diffusers("flux"), "flux")


def _control(batch, n_img, width, seed=9, skip=()):
    """Residuals as a Flux ControlNet gives them: one (B, image tokens, width) per double and per
    single block (None at the indices in ``skip``, as ControlNets with fewer blocks give)."""
    g = torch.Generator().manual_seed(seed)

    def residual(i):
        return None if i in skip else 2.0 * torch.randn(batch, n_img, width, generator=g)

    return {"input": [residual(0), residual(1)], "output": [residual(2), residual(3)]}


def _recording(model):
    """A clone of ``model`` whose ``patches_replace["dit"]`` entries (ours, or the plain block where
    there is none) record (key, input tokens, handed-back tokens), and whose final layer records its
    input; returns (clone, records, final-layer inputs, hook handle)."""
    m = model.clone()
    entries = m.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
    records = []
    for key in BLOCKS:
        inner = entries.get(key)

        def entry(args, extra, inner=inner, key=key):
            seen = args["img"].clone()  # before the block: Flux blocks add to their input in place
            out = inner(args, extra) if inner is not None else extra["original_block"](args)
            records.append((key, seen, out["img"].clone()))
            return out

        m.set_model_patch_replace(entry, "dit", *key)
    finals = []
    handle = m.model.diffusion_model.final_layer.register_forward_pre_hook(lambda mod, args: finals.append(args[0].clone()))
    return m, records, finals, handle


def _run_recorded(model, x, ctx, conds, control):
    m, records, finals, handle = _recording(model)
    try:
        out = run_dit(m, x, SIGMA, ctx, control=control, **conds)
    finally:
        handle.remove()
    return out, records, finals


def _assert_residuals_on_every_token(records, finals, control, n_txt):
    """Each block's input is the previous block's full-length output plus its residual, on every
    image token, exactly as ComfyUI adds it (the text tokens untouched)."""
    assert [key for key, _, _ in records] == BLOCKS
    (_, _, d0), (_, d1_in, d1), (_, s0_in, s0), (_, s1_in, s1) = records
    c_in, c_out = control["input"], control["output"]
    n_img = d0.shape[1]
    assert d1.shape[1] == n_img and s0.shape[1] == s1.shape[1] == n_txt + n_img  # whole sequences handed back

    def plus(out, add):
        return out if add is None else out + add

    assert torch.equal(d1_in, plus(d0, c_in[0]))
    assert torch.equal(s0_in[:, n_txt:], plus(d1, c_in[1]))
    assert torch.equal(s1_in[:, :n_txt], s0[:, :n_txt])
    assert torch.equal(s1_in[:, n_txt:], plus(s0[:, n_txt:], c_out[0]))
    assert torch.equal(finals[0], plus(s1[:, n_txt:], c_out[1]))


@pytest.mark.parametrize("mode", ("block", "kv"))
def test_controlnet_residuals_land_on_every_token_when_merged(flux, mode):
    x, ctx, conds = inputs("flux")
    n_img, width = (x.shape[-2] // 2) * (x.shape[-1] // 2), flux.model.diffusion_model.hidden_size
    control = _control(x.shape[0], n_img, width)
    plain = run_dit(flux, x, SIGMA, ctx, **conds)
    ref = run_dit(flux, x, SIGMA, ctx, control=control, **conds)
    assert ((ref - plain).norm() / plain.norm()).item() > 0.05  # the residuals matter
    # ratio 0: our entries in place, the ControlNet result of the model alone bit for bit
    assert torch.equal(run_dit(tome_node(flux, ratio=0.0, dit_mode=mode), x, SIGMA, ctx, control=control, **conds), ref)

    merged_model = tome_node(flux, ratio=0.5, dit_mode=mode)
    with recorded_plans() as plans:
        merged, records, finals = _run_recorded(merged_model, x, ctx, conds, control)
    assert len(plans) == len(BLOCKS) and all(p is not None and p.n_groups == n_img // 2 for p in plans)
    _assert_residuals_on_every_token(records, finals, control, ctx.shape[1])
    # the same check holds for the model alone (the recording is faithful)
    alone, records_alone, finals_alone = _run_recorded(flux, x, ctx, conds, control)
    assert torch.equal(alone, ref)
    _assert_residuals_on_every_token(records_alone, finals_alone, control, ctx.shape[1])
    # merging with the ControlNet stays as close to the unmerged ControlNet run as without it
    err_with = ((merged - ref).norm() / ref.norm()).item()
    err_without = ((run_dit(merged_model, x, SIGMA, ctx, **conds) - plain).norm() / plain.norm()).item()
    assert torch.isfinite(merged).all() and err_with < 2 * err_without + 0.05, (err_with, err_without)


def test_controlnet_with_fewer_blocks_and_patch_removed(flux):
    """A ControlNet with residuals for some blocks only (None elsewhere) under block merging; a
    second node at ratio 0 on the merged model (it replaces ours) gives the unmerged result."""
    x, ctx, conds = inputs("flux", batch=1, hw=(12, 20))
    n_img, width = 6 * 10, flux.model.diffusion_model.hidden_size
    control = _control(1, n_img, width, skip=(1, 2))
    ref = run_dit(flux, x, SIGMA, ctx, control=control, **conds)
    merged_model = tome_node(flux, ratio=0.5, seed=3)
    merged, records, finals = _run_recorded(merged_model, x, ctx, conds, control)
    _assert_residuals_on_every_token(records, finals, control, ctx.shape[1])
    assert not torch.allclose(merged, ref, atol=1e-5)
    assert torch.equal(run_dit(tome_node(merged_model, ratio=0.0), x, SIGMA, ctx, control=control, **conds), ref)

"""Stacks in `tomesd-ext bench`: --steps N on diffusion transformers (flow-matching Euler with
CFG), diffusers' FirstBlockCache alone and with ours, torch.compile alone and with ours."""

import json

import pytest
import torch

from tomesd_ext import cli

RUN = ["--repeats", "1", "--warmup", "0", "--no-progress"]


def _rows(tmp_path, *argv):
    out = tmp_path / "r.json"
    assert cli.main(["bench", *argv, *RUN, "--json", str(out)]) == 0
    return json.loads(out.read_text())["rows"]


@pytest.mark.parametrize("model, batch", [("tiny-flux", "1"), ("tiny-sd3", "2"), ("tiny-pixart", "2")])
def test_dit_steps_sample_and_report_final_latent_errors(model, batch, tmp_path):
    # 768 px: above apply_tome's auto-skip threshold, so tome merges and its final latents differ
    rows = _rows(tmp_path, "--model", model, "--resolution", "768" if model != "tiny-flux" else "64",
                 "--batch", batch, "--steps", "2", "--inputs", "photo", "--methods", "tome" if model != "tiny-flux" else "baseline")
    assert rows[0]["method"] == "baseline" and rows[0]["rel_error_latent"] == 0.0 and rows[0]["steps"] == 2
    if len(rows) > 1:
        assert rows[1]["rel_error_latent"] > 0


def test_video_transformer_steps(tmp_path):
    (row,) = _rows(tmp_path, "--model", "tiny-wan", "--steps", "2", "--methods", "baseline")
    assert row["rel_error_latent"] == 0.0 and row["temporal"] == 1.0


def test_flow_sigmas_and_euler_step():
    from types import SimpleNamespace

    from tomesd_ext.bench.denoise import denoise
    from tomesd_ext.bench.flow import flow_sigmas, time_shift
    from tomesd_ext.bench.inputs import BenchInput

    unshifted = SimpleNamespace(family="pixart-like")  # no SHIFT entry: s = 1
    sigmas = flow_sigmas(unshifted, 4, 500, (1, 16, 8, 8))
    torch.testing.assert_close(sigmas, torch.tensor([0.5, 0.375, 0.25, 0.125, 0.0], dtype=torch.float64))
    shifted = flow_sigmas(SimpleNamespace(family="sd3"), 4, 500, (1, 16, 8, 8))
    assert shifted[0] == pytest.approx(0.75) and shifted[-1] == 0 and bool((shifted[:-1] > shifted[1:]).all())
    assert time_shift("flux", 256) == pytest.approx(torch.tensor(0.5).exp().item())
    assert time_shift("flux", 4096) == pytest.approx(torch.tensor(1.15).exp().item())

    # a model whose velocity is exactly noise - x0 brings the Euler sampler to x0, CFG or not
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(1, 16, 4, 4, generator=gen), torch.randn(1, 16, 4, 4, generator=gen)
    from tomesd_ext.bench.flow import FlowSchedule

    subject = SimpleNamespace(family="sd3", is_dit=True, device=torch.device("cpu"), dtype=torch.float32,
                              scheduler=FlowSchedule(), denoiser=torch.nn.Identity(),
                              forward=lambda x, t, cond: (noise - x0).expand_as(x))
    for cfg in (False, True):
        out = denoise(subject, BenchInput("photo", x0, noise), {}, cfg, 3, 600)
        torch.testing.assert_close(out.final, x0, rtol=0, atol=1e-5)


def test_fbcache_rows_report_cache_hits(tmp_path):
    # the seeded random models change their first block's residual by 0.2-0.5 per step: a
    # threshold of 0.3 skips some steps of tiny-flux (diffusers' 0.05 skips none here)
    rows = _rows(tmp_path, "--model", "tiny-flux", "--resolution", "64", "--steps", "8", "--inputs", "photo",
                 "--methods", "fbcache,tome+fbcache", "--cache-threshold", "0.3")
    assert [r["method"] for r in rows] == ["baseline", "fbcache", "tome+fbcache"]
    assert "cache_hits" not in rows[0]
    for r in rows[1:]:
        assert 0 < r["cache_hits"] < r["denoiser_calls"] == 8
        assert r["rel_error"] == 0.0  # the first call always runs every block
        assert r["rel_error_latent"] > 0


def test_caches_and_tome_are_removed_exactly():
    from tomesd_ext.bench.methods import MethodContext, get_method
    from tomesd_ext.models import build_transformer, dit_call, text_conditioning

    model = build_transformer("tiny-flux")
    cond = text_conditioning("flux", model.config, 1, 8, 0)
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = dit_call(model, "flux", x, 500, cond["text"], cond["pooled"])
        for name in ("fbcache", "tome+fbcache", "taylorseer", "tome+taylorseer"):
            method = get_method(name)
            method.apply(model, 0.5, MethodContext(seed=0, max_downsample=None))
            assert model.is_cache_enabled
            method.remove(model)
        assert not model.is_cache_enabled
        torch.testing.assert_close(dit_call(model, "flux", x, 500, cond["text"], cond["pooled"]), before, rtol=0, atol=0)


def test_compile_and_tome_compile_on_the_tiny_unet(tmp_path, capsys):
    # dynamo with the eager backend: the capture (graph breaks, recompiles) without inductor's
    # code generation, which takes minutes on a shared CPU. 384 px: tome merges (48 x 48 tokens).
    rows = _rows(tmp_path, "--model", "tiny", "--resolution", "384", "--steps", "2", "--inputs", "photo",
                 "--methods", "tome,compile,tome+compile", "--compile-backend", "eager")
    by = {r["method"]: r for r in rows}
    compiled, tome, tome_compiled = by["compile"], by["tome"], by["tome+compile"]
    assert compiled["rel_error"] < 1e-5 and compiled["rel_error_latent"] < 1e-5  # equal to eager
    assert compiled["recompiles"] == 0 and compiled["compile_seconds"] > 0 and compiled["graph_breaks"] == 0
    assert tome["rel_error_latent"] > 0
    assert tome_compiled["rel_error_latent"] == pytest.approx(tome["rel_error_latent"], rel=1e-3)
    assert tome_compiled["rel_error"] == pytest.approx(tome["rel_error"], rel=1e-3)
    for key in ("compile_seconds", "graph_breaks", "recompiles", "recompiles_warmup"):
        assert key in tome_compiled and key not in tome
    assert "first call (compiles)" in capsys.readouterr().out


def test_own_denoisers_count_compiles_per_resolution():
    from types import SimpleNamespace

    from tomesd_ext.bench.compiled import OwnDenoisers
    from tomesd_ext.bench.methods import MethodContext

    def build(model, ratio, ctx):
        own = torch.nn.Sequential(torch.nn.Linear(4, 4))
        own.compile(backend=ctx.compile_backend)
        return own

    method = SimpleNamespace(name="c", build=build)
    own = OwnDenoisers(None, MethodContext(0, None, compile_backend="eager"))
    for _ in range(2):  # two resolutions: each builds, compiles and counts anew
        own.clear()
        own.measuring = False
        model = own.get(method, None)
        assert own.get(method, None) is model and not own.called("c", None)
        with own.counting("c", None):
            model(torch.ones(2, 4))
        assert own.called("c", None)
        own.measuring = True
        with own.counting("c", None):
            model(torch.ones(2, 4))  # the compiled code is reused
        assert own.stats[("c", None)]["recompiles"] == 0
        with own.counting("c", None):
            model(torch.ones(2, 3, 4))  # a new shape: dynamo compiles again
        stats = own.stats[("c", None)]
        assert stats["graphs"] >= 1 and stats["graph_breaks"] == 0 and stats["recompiles"] >= 1
    own.clear()
    assert not own.models and not own.stats


def test_tome_compile_on_a_transformer_merges(tmp_path):
    # the compiled copies share code objects: the merged copy (forward hooks) must not run the
    # plain copy's graph (compiled.py guards on hooks while copies exist)
    import torch._dynamo

    before = torch._dynamo.config.skip_nnmodule_hook_guards
    rows = _rows(tmp_path, "--model", "tiny-flux", "--resolution", "768", "--steps", "2", "--inputs", "photo",
                 "--methods", "tome,compile,tome+compile", "--compile-backend", "eager")
    by = {r["method"]: r for r in rows}
    assert by["compile"]["rel_error_latent"] < 1e-5
    assert by["tome+compile"]["rel_error_latent"] == pytest.approx(by["tome"]["rel_error_latent"], rel=1e-3)
    assert by["tome"]["rel_error_latent"] > 0 and by["compile"]["recompiles"] == 0
    assert torch._dynamo.config.skip_nnmodule_hook_guards == before

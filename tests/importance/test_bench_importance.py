"""`tomesd-ext bench --methods tome,importance`: the importance method is registered and acts."""

import json

from tomesd_ext import cli


def test_importance_is_a_bench_method(tmp_path):
    out = tmp_path / "r.json"
    argv = [
        "bench", "--model", "tiny", "--resolution", "64", "--ratios", "0.5", "--repeats", "0", "--warmup", "0",
        "--no-progress", "--methods", "tome,importance", "--steps", "3", "--inputs", "photo", "--json", str(out),
    ]
    assert cli.main(argv) == 0
    rows = {row["method"]: row for row in json.loads(out.read_text())["rows"]}
    tome, imp = rows["tome"], rows["importance"]
    # the first denoiser call has no map yet: exactly ToMe's plan, so the same first-step error
    assert imp["rel_error"] == tome["rel_error"]
    # later steps draw destinations from the map: a different result
    assert imp["rel_error_latent"] != tome["rel_error_latent"] and imp["rel_error_latent"] > 0


def test_overhead_microbenchmark_runs():
    from tomesd_ext.bench.importance_overhead import measure

    result = measure(side=8, width=16, ratio=0.5, repeats=2)
    assert set(result) == {"tome_plan_ms", "importance_plan_ms", "per_step_ms"}
    assert all(v > 0 for v in result.values())

"""scripts/gpu_check.sh --dry-run: every stage of the GPU run on the CPU at tiny sizes, so the first
run on a lent GPU fails on nothing but the GPU. Each stage must succeed and record its result;
each bench must have measured every method, with merging active (an error above zero)."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "scripts", "gpu_check.sh")
STAGES = ["environment", "build", "parity", "sd15", "sdxl", "flux", "sd35", "wan"]
BENCH_METHODS = {
    "sd15": {"baseline", "tomesd", "tome-torch", "tome-level", "tome-level-k2"},
    "sdxl": {"baseline", "tomesd", "tome-torch", "tome-level", "tome-level-k2"},
    "flux": {"baseline", "tome-torch", "tome-k2", "tome-k4", "compile", "tome+compile"},
    "sd35": {"baseline", "tome-torch", "tome-k2"},
    "wan": {"baseline", "tome-torch", "tome-k2"},
}


def _run(out, *args, timeout=1800):
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, TOMESD_EXT_KERNELS="torch")
    env.pop("PYTHONPATH", None)  # the script puts the checkout on the path itself
    return subprocess.run(["bash", SCRIPT, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_unknown_argument_exits_2(tmp_path):
    done = _run(tmp_path, "--gpu", timeout=60)
    assert done.returncode == 2 and "unknown argument --gpu" in done.stdout


def test_dry_run_runs_every_stage(tmp_path):
    done = _run(tmp_path, "--dry-run")
    tail = done.stdout[-6000:] + done.stderr[-3000:]
    assert done.returncode == 0, tail
    stages = json.loads((tmp_path / "stages.json").read_text())
    assert [s["stage"] for s in stages] == STAGES, tail
    for s in stages:
        assert s["ok"] and s["rc"] == 0 and s["dry_run"], s
        for f in s["files"]:
            assert (tmp_path / f).is_file(), (s, f)
        assert json.loads((tmp_path / f"stage_{s['stage']}.json").read_text()) == s
    for name, methods in BENCH_METHODS.items():
        rows = json.loads((tmp_path / f"bench_{name}.json").read_text())["rows"]
        assert {r["method"] for r in rows} == methods, name
        for r in rows:
            assert r["seconds_median"] > 0, (name, r)
            if r["method"] not in ("baseline", "compile"):
                # tiny sizes with --min-tokens 0: every merged method changes the output
                assert r["rel_error"] > 1e-4, (name, r["method"], r["rel_error"])

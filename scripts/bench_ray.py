"""Wall time of a six-job tiny edit-video batch, serial vs --ray, and the per-job overhead of Ray.

The batch: the moving-shapes clip (8 frames, 64 px), tiny model, 4 DDIM steps; three source
prompts x two edit prompts (three inversions, each shared by two jobs). Each run gets a fresh
folder (outputs and inversion cache), runs the CLI as a subprocess and is timed from outside
(process start to exit, so Python imports, cluster start and model loads are included); serial
runs twice, with torch's default threads and with OMP_NUM_THREADS=1 (what a 1-CPU worker uses).

Per-job overhead: one warm actor (pipeline loaded by a first job) runs the six jobs one by one;
overhead = the driver's round-trip time of `actor.run` minus the seconds the job reports for
itself (dispatch, pickling the Job and the JobResult, scheduling). Also printed: ray.init and
the time until a new actor answers (process start, imports).

Run (from the repo root): PYTHONPATH=. python scripts/bench_ray.py [--workers 2]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from tomesd_ext.video import moving_shapes, write_mp4

ROOT = Path(__file__).resolve().parents[1]


def make_batch(folder: Path) -> Path:
    folder.mkdir(parents=True)
    write_mp4(moving_shapes(8, 64), folder / "clip.mp4", 8)
    jobs = [
        {"name": f"j{i}{k}", "input": "clip.mp4", "output": f"out/j{i}{k}", "source_prompt": src, "edit_prompt": edit, "seed": i}
        for i, src in enumerate(["shapes", "a red disc", "a blue square"])
        for k, edit in enumerate(["a cat", "a dog"])
    ]
    f = folder / "jobs.yaml"
    f.write_text(yaml.safe_dump({"defaults": {"model": "tiny", "steps": 4, "size": 64, "cache_dir": "cache"}, "jobs": jobs}))
    return f


def timed_cli(jobs_file: Path, *extra, threads=None):
    """(wall seconds, sum of the jobs' own seconds from the --json summary)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    summary = jobs_file.parent / "summary.json"
    cmd = [sys.executable, "-m", "tomesd_ext.cli", "edit-video", str(jobs_file), "--no-progress", "--json", str(summary), *extra]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    return wall, sum(r["seconds"] for r in json.loads(summary.read_text()))


def per_job_overhead(jobs_file: Path):
    import ray

    from tomesd_ext.video.jobs import load_jobs_file, parse_jobs
    from tomesd_ext.video.ray_runner import JobWorker

    raw, base = load_jobs_file(jobs_file)
    jobs = [j for _, j in parse_jobs(raw, base, jobs_file)]
    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    t_init = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()
        actor = ray.remote(JobWorker).options(num_cpus=1).remote(1, None)
        ray.get(actor.pid.remote())
        t_actor = time.perf_counter() - t0
        ray.get(actor.run.remote(jobs[0]))  # loads the pipeline
        over = []
        for job in jobs[1:]:
            t0 = time.perf_counter()
            res = ray.get(actor.run.remote(job))
            over.append(time.perf_counter() - t0 - res.seconds)
    finally:
        ray.shutdown()
    return t_init, t_actor, over


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        runs = {
            "serial (torch default threads)": timed_cli(make_batch(tmp / "serial")),
            "serial (OMP_NUM_THREADS=1)": timed_cli(make_batch(tmp / "serial1"), threads=1),
            f"--ray --ray-workers {args.workers}": timed_cli(make_batch(tmp / "ray"), "--ray", "--ray-workers", str(args.workers)),
        }
        t_init, t_actor, over = per_job_overhead(make_batch(tmp / "overhead"))
    print("six-job batch: wall time (process start to exit) | sum of the jobs' own seconds")
    for name, (wall, jobs) in runs.items():
        print(f"  {name:34s} {wall:6.1f} s | {jobs:6.1f} s")
    print(f"ray.init (local cluster) {t_init:.1f} s; a new actor answers after {t_actor:.1f} s")
    print(f"per-job overhead on a warm actor (round trip - job seconds), {len(over)} jobs: "
          f"median {1000 * statistics.median(over):.0f} ms, max {1000 * max(over):.0f} ms")


if __name__ == "__main__":
    main()

"""`tomesd-ext edit-video JOBS.yaml`: batch zero-shot video editing (VidToMe or per-frame)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import ExitStack
from pathlib import Path


CLUSTER_LOST = 3  # exit status: the Ray cluster went away mid-run (docs/errors.md)


def _count(lo: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < lo:
            raise argparse.ArgumentTypeError(f"{text!r} is not allowed: an integer >= {lo}")
        return value
    return parse


def add_parser(subparsers):
    p = subparsers.add_parser(
        "edit-video",
        help="run a batch of video edits described in a YAML file",
        description="Run the video edits of JOBS.yaml (see docs/video.md). Finished jobs are skipped on "
        "a rerun; a failing job is reported and the others continue.",
    )
    p.add_argument("jobs", help="YAML file with `jobs:` (and optional `defaults:`)")
    p.add_argument("--force", action="store_true", help="redo jobs whose output is already finished")
    p.add_argument("--only", action="append", default=[], metavar="NAME", help="run only this job (repeatable)")
    p.add_argument("--json", metavar="PATH", help="also write the summary as JSON to PATH ('-' = stdout)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run the jobs on Ray workers: a local cluster, or the cluster at ADDRESS "
                   "(needs pip install 'tomesd-ext[ray]'; docs/video.md)")
    p.add_argument("--ray-workers", type=_count(1), metavar="N",
                   help="with --ray: worker actors (default: one per GPU; without GPUs one per 4 CPUs)")
    p.add_argument("--ray-retries", type=_count(0), metavar="N",
                   help="with --ray: restarts of a job whose worker died before it is failed (default: 2)")
    p.set_defaults(run=run)
    return p


def run(args) -> int:
    with ExitStack() as session:
        return _run(args, session)


def _run(args, session: ExitStack) -> int:
    from ..video.jobs import NOT_DONE, JobError, JobResult, format_table, load_jobs_file, parse_jobs
    from .checks import check_output_file, write_text_atomic

    try:
        if args.ray is None and (args.ray_workers is not None or args.ray_retries is not None):
            raise ValueError("--ray-workers and --ray-retries need --ray")
        if args.ray is not None:
            from ..video.ray_runner import check_address, import_ray

            if args.ray:
                check_address(args.ray)
            import_ray()
        if args.json:
            check_output_file("--json", args.json, stdout_ok=True)
        raw, base = load_jobs_file(args.jobs)
    except (JobError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    parsed = [(i, job, _job_name(raw[i], i, job)) for i, job in parse_jobs(raw, base, Path(args.jobs).resolve())]
    names = [name for _, _, name in parsed]
    unknown = [n for n in dict.fromkeys(args.only) if n not in names]
    if unknown:
        print(f"error: --only {', '.join(map(repr, unknown))}: no such job in {args.jobs}; "
              f"its jobs are {', '.join(map(repr, names)) or 'none'}", file=sys.stderr)
        return 2
    results, jobs = [], []
    for i, job, name in parsed:
        if args.only and name not in args.only:
            continue
        if isinstance(job, JobError):
            results.append((i, JobResult(name, "failed", message=str(job))))
        else:
            jobs.append(job)
    show = not args.no_progress
    if args.ray is not None:
        from ..video.jobs import is_finished
        from ..video.ray_runner import ray_session

        if any(args.force or not is_finished(j) for j in jobs):  # else no cluster is needed
            try:
                session.enter_context(ray_session(args.ray))
            except ConnectionError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
        ray_results, lost = _run_on_ray(args, jobs, show)
        results += ray_results
    else:
        results, lost = results + _run_serial(args, jobs, show), None
    ordered = [r for _, r in sorted(results, key=lambda x: x[0])]
    print(format_table(ordered))
    n_failed = sum(r.status == "failed" for r in ordered)
    n_not_done = sum(r.status == NOT_DONE for r in ordered)
    print(f"{len(ordered)} job(s): {sum(r.status == 'done' for r in ordered)} done, "
          f"{sum(r.status == 'skipped' for r in ordered)} skipped, {n_failed} failed"
          + f", {n_not_done} {NOT_DONE}" * bool(n_not_done))
    if args.json:
        data = json.dumps([r.__dict__ for r in ordered], indent=2, default=str)
        if args.json == "-":
            print(data)
        else:
            write_text_atomic(args.json, data)
    if lost:
        print(f"error: {lost} (--ray {args.ray or 'local'}); {n_not_done} job(s) {NOT_DONE}: "
              "finished outputs are complete, a rerun runs the rest", file=sys.stderr)
        return CLUSTER_LOST
    return 1 if n_failed else 0


def _job_name(item, index: int, job) -> str:
    """The name --only selects a job by: its parsed name, or for a job that failed to parse its
    `name:` field, else "job N"."""
    if not isinstance(job, Exception):
        return job.name
    return str(item.get("name")) if isinstance(item, dict) and item.get("name") else f"job {index + 1}"


def _skipped(job):
    from ..video.jobs import JobResult

    return JobResult(job.name, "skipped", output=str(job.output), message="already finished")


def _run_serial(args, jobs, show) -> list:
    """[(index, JobResult)]: the jobs one after another in this process."""
    from tqdm.auto import tqdm

    from ..video.jobs import PipelineCache, is_finished, run_job

    pipes, results = PipelineCache(), []

    def step_bar(total, name):
        return tqdm(total=total, desc=f"  {name} steps", leave=False, position=1, disable=not show, file=sys.stderr)

    outer = tqdm(jobs, desc="jobs", position=0, disable=not show, file=sys.stderr)
    for job in outer:
        outer.set_postfix_str(job.name)
        if is_finished(job) and not args.force:
            results.append((job.index, _skipped(job)))
            continue
        res = run_job(job, pipes, step_bar)
        if res.status == "failed":
            tqdm.write(f"job {job.name} failed: {res.message}", file=sys.stderr)
        results.append((job.index, res))
    outer.close()
    return results


def _after_loss(job, started: float):
    """The result of a job the lost cluster did not report: done when a worker still finished its
    output (job.json written since `started`: outputs are renamed into place whole), else NOT_DONE."""
    from ..video.jobs import NOT_DONE, JobResult

    record = job.output / "job.json"
    if record.is_file() and record.stat().st_mtime >= started:
        return JobResult(job.name, "done", output=str(job.output), message="its worker finished it after the cluster was lost")
    return JobResult(job.name, NOT_DONE, output=str(job.output), message="the Ray cluster was lost")


def _run_on_ray(args, jobs, show) -> tuple:
    """([(index, JobResult)], None) of unfinished jobs on Ray workers (video/ray_runner.py), one
    bar over jobs; when the cluster is lost mid-run, the jobs it did not finish are NOT_DONE and
    the second item says what happened."""
    from tqdm.auto import tqdm

    from ..video.jobs import is_finished
    from ..video.ray_runner import ClusterLostError, run_batch

    retries = 2 if args.ray_retries is None else args.ray_retries
    todo = [j for j in jobs if args.force or not is_finished(j)]
    results = [(j.index, _skipped(j)) for j in jobs if j not in todo]
    bar = tqdm(total=len(jobs), initial=len(results), desc="jobs", disable=not show, file=sys.stderr)

    def on_result(job, res):
        bar.update(1)
        bar.set_postfix_str(job.name)
        if res.status == "failed":
            tqdm.write(f"job {job.name} failed: {res.message}", file=sys.stderr)

    def on_retry(job, reason, attempt):
        tqdm.write(f"job {job.name}: its worker died ({reason}); retry {attempt} of {retries}", file=sys.stderr)

    lost, started = None, time.time()
    try:
        if todo:
            results += run_batch(todo, args.ray_workers, retries, on_result, on_retry)
    except ClusterLostError as e:
        ended = {i for i, _ in e.results}
        results += e.results + [(j.index, _after_loss(j, started)) for j in todo if j.index not in ended]
        lost = str(e)
    finally:
        bar.close()
    return results, lost

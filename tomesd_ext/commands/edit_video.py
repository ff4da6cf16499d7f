"""`tomesd-ext edit-video JOBS.yaml`: batch zero-shot video editing (VidToMe or per-frame)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


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
    p.set_defaults(run=run)
    return p


def run(args) -> int:
    from tqdm.auto import tqdm

    from ..video.jobs import JobError, JobResult, PipelineCache, format_table, is_finished, load_jobs_file, parse_jobs, run_job
    from .checks import check_output_file, write_text_atomic

    try:
        if args.json:
            check_output_file("--json", args.json, stdout_ok=True)
        raw, base = load_jobs_file(args.jobs)
    except (JobError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results, jobs = [], []
    for i, job in parse_jobs(raw, base, Path(args.jobs).resolve()):
        if isinstance(job, JobError):
            item = raw[i]
            name = item.get("name") if isinstance(item, dict) and item.get("name") else f"job {i + 1}"
            if args.only and name not in args.only:
                continue
            results.append((i, JobResult(str(name), "failed", message=str(job))))
            continue
        if args.only and job.name not in args.only:
            continue
        jobs.append(job)
    pipes = PipelineCache()
    show = not args.no_progress

    def step_bar(total, name):
        return tqdm(total=total, desc=f"  {name} steps", leave=False, position=1, disable=not show, file=sys.stderr)

    outer = tqdm(jobs, desc="jobs", position=0, disable=not show, file=sys.stderr)
    for job in outer:
        outer.set_postfix_str(job.name)
        if is_finished(job) and not args.force:
            results.append((job.index, JobResult(job.name, "skipped", output=str(job.output), message="already finished")))
            continue
        res = run_job(job, pipes, step_bar)
        if res.status == "failed":
            tqdm.write(f"job {job.name} failed: {res.message}", file=sys.stderr)
        results.append((job.index, res))
    outer.close()
    ordered = [r for _, r in sorted(results, key=lambda x: x[0])]
    print(format_table(ordered))
    n_failed = sum(r.status == "failed" for r in ordered)
    print(f"{len(ordered)} job(s): {sum(r.status == 'done' for r in ordered)} done, "
          f"{sum(r.status == 'skipped' for r in ordered)} skipped, {n_failed} failed")
    if args.json:
        data = json.dumps([r.__dict__ for r in ordered], indent=2, default=str)
        if args.json == "-":
            print(data)
        else:
            write_text_atomic(args.json, data)
    return 1 if n_failed else 0

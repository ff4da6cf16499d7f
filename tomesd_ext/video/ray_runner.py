"""Running the jobs of an edit-video batch on Ray (`tomesd-ext edit-video JOBS.yaml --ray`).

Workers are Ray actors (`JobWorker`), each holding a loaded pipeline (jobs.PipelineCache) and
running one job at a time through jobs.run_job, so a job's outputs, inversion cache entry and
atomic writes are exactly those of the serial run. The driver (`run_batch`) hands jobs to idle
workers in file order; while the first job of an inversion group (jobs.inversion_group) runs, the
group's other jobs wait, then run in parallel on the cached inversion, so jobs sharing an
inversion reuse it and never compute it twice at once. Jobs go only to actors that have started
(one the cluster cannot place gets none). A worker that dies (killed, out of memory, node lost)
is replaced; its job's temporaries are removed and the job is retried up to `retries` times, then
reported failed with the reason.

The cluster itself going away (`ray stop`, the head node lost) is not a worker death: the driver
checks while it waits that the cluster's GCS still accepts connections, and when it has not for
GCS_GRACE_S (or Ray says this driver's own node died) it stops with ClusterLostError, which
carries the results of the jobs that ended before. Ray's own calls would wait for the GCS and
then end the driver process (after 60 s) with no summary, so after the loss the driver makes
only calls that do not need the GCS.

Ray is optional (`pip install 'tomesd-ext[ray]'`) and imported only here, lazily.
"""

from __future__ import annotations

import os
import socket
import time
from collections import Counter, deque
from contextlib import contextmanager
from typing import Callable, List, Optional, Tuple

from .jobs import Job, JobResult, PipelineCache, discard_partial, inversion_group, run_job

RAY_INSTALL = "pip install 'tomesd-ext[ray]'"


class RayMissingError(ImportError):
    """Ray is not installed; the message names the extra that installs it."""


class ClusterLostError(RuntimeError):
    """The Ray cluster went away mid-run. address: its GCS; what: what was seen; results: the
    [(job.index, JobResult)] of the jobs that ended before (the others did not finish)."""

    def __init__(self, address: str, what: str, results: list):
        super().__init__(f"the Ray cluster at {address} was lost mid-run: {what}")
        self.address, self.what, self.results = address, what, results


GCS_GRACE_S = 10.0  # a GCS that does not answer this long is lost (Ray ends the driver at 60 s)


class _ClusterWatch:
    """Whether the cluster's GCS (HOST:PORT) still accepts connections, checked at most once a
    second; a refusal shorter than GCS_GRACE_S (a restarting GCS) is waited out."""

    def __init__(self, address: Optional[str]):
        self.address, self.down_since, self.last, self.why = address, None, 0.0, ""

    def reachable(self) -> bool:
        host, _, port = (self.address or "").rpartition(":")
        if not port.isdigit():
            return True  # no GCS address to check (e.g. a Ray Client connection)
        try:
            socket.create_connection((host, int(port)), timeout=2).close()
        except OSError as e:
            self.why = f"its GCS does not answer ({e.strerror or e})"
            return False
        return True

    def lost(self) -> Optional[str]:
        """None while the cluster is there; else what was seen."""
        now = time.monotonic()
        if now - self.last < 1.0:
            return None
        self.last = now
        if self.reachable():
            self.down_since = None
            return None
        self.down_since = self.down_since or now
        return f"{self.why} for {now - self.down_since:.0f} s" if now - self.down_since >= GCS_GRACE_S else None


def _gcs_address(ray) -> Optional[str]:
    try:
        return ray.get_runtime_context().gcs_address
    except Exception:  # noqa: BLE001 - a connection without one (Ray Client): not watched
        return None


def import_ray():
    """The ray module, or RayMissingError saying how to install it."""
    try:
        import ray
    except ImportError as e:
        raise RayMissingError(f"--ray needs Ray, which is not installed: {RAY_INSTALL}") from e
    return ray


class JobWorker:
    """A Ray actor body: one pipeline cache, jobs run one at a time. threads: torch CPU threads."""

    def __init__(self, threads: int, device: Optional[str]):
        import torch

        torch.set_num_threads(threads)
        self.pipes = PipelineCache(device)

    def pid(self) -> int:
        return os.getpid()

    def run(self, job: Job) -> JobResult:
        return run_job(job, self.pipes)


def _worker_options(ray, workers: Optional[int]) -> Tuple[int, dict, int, Optional[str]]:
    """(count, actor options, torch threads, device): one actor per GPU with num_gpus=1 when the
    cluster has GPUs; otherwise `workers` CPU actors (default: one per 4 CPUs) sharing the CPUs,
    at most one node's CPUs each (an actor cannot span nodes)."""
    res = ray.cluster_resources()
    gpus, cpus = int(res.get("GPU", 0)), float(res.get("CPU", 1))
    if gpus:
        n = workers or gpus
        return n, {"num_gpus": 1, "num_cpus": 1}, 1, "cuda"
    n = workers or max(1, int(cpus) // 4)
    node = max((x["Resources"].get("CPU", 0) for x in ray.nodes() if x.get("Alive")), default=cpus)
    share = min(cpus / n, node)
    return n, {"num_cpus": int(share) if share >= 1 else share}, max(1, int(share)), None


def _death_reason(err) -> str:
    """One line saying why a worker died, from Ray's (long) error text."""
    text = str(err)
    for line in text.splitlines():
        if "is dead because" in line or "exit detail" in line.lower():
            return line.strip().split(" Some common causes")[0]
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


ADDRESS_FORMS = "HOST:PORT (e.g. 10.0.0.5:6379), ray://HOST:PORT, auto or local"


def check_address(address: str) -> None:
    """ValueError unless `address` has a form ray.init takes (ADDRESS_FORMS); checked before Ray
    is imported or any job runs, so a typo is one line instead of Ray's traceback."""
    if address in ("auto", "local"):
        return
    rest = address[len("ray://"):] if address.startswith("ray://") else address
    host, sep, port = rest.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host  # [IPv6]:PORT
    if not (sep and host and port.isdigit() and 0 < int(port) < 65536) or "/" in host or any(c.isspace() for c in host):
        raise ValueError(f"--ray {address!r} is not a Ray address: use {ADDRESS_FORMS}, or --ray alone for a local cluster")


def _check_reachable(address: str) -> None:
    """A HOST:PORT address must accept a connection (Ray itself retries for minutes)."""
    host, _, port = address.rpartition(":")
    if "://" in address or address == "auto" or not port.isdigit():
        return  # ray://, auto: left to Ray
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
    except OSError as e:
        raise ConnectionError(f"--ray {address!r}: no Ray cluster answers there ({e.strerror or e})") from e


@contextmanager
def ray_session(address: Optional[str]):
    """Join the cluster at `address`, or start a local one when it is None or empty, and shut
    down at the end. A Ray already initialised in this process is used as it is (and kept)."""
    ray = import_ray()
    if address:
        _check_reachable(address)
    if ray.is_initialized():
        yield ray
        return
    if address:
        ray.init(address=address)
    else:
        ray.init(include_dashboard=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def _kill(ray, idle, starting, running) -> None:
    for a in [w[0] for w in idle] + list(starting.values()) + [w[0] for _, w in running.values()]:
        ray.kill(a)


def run_batch(
    jobs: List[Job],
    workers: Optional[int] = None,
    retries: int = 2,
    on_result: Optional[Callable[[Job, JobResult], None]] = None,
    on_retry: Optional[Callable[[Job, str, int], None]] = None,
) -> List[Tuple[int, JobResult]]:
    """Run `jobs` on the workers of the connected Ray (ray_session); returns [(job.index,
    JobResult)] in completion order, one per job. on_result(job, result) is called as each job
    ends; on_retry(job, reason, attempt) when a job's worker died and the job is queued again."""
    ray = import_ray()
    n, options, threads, device = _worker_options(ray, workers)
    actor = ray.remote(JobWorker).options(**options)
    watch = _ClusterWatch(_gcs_address(ray))
    starting, idle = {}, []  # pid ref of an actor not yet up -> actor; (actor, pid) of workers that are up

    def spawn():
        a = actor.remote(threads, device)
        starting[a.pid.remote()] = a

    for _ in range(min(n, len(jobs))):
        spawn()
    pending, running = deque(jobs), {}
    busy, cached = set(), set()  # inversion groups being computed / already in the cache
    attempts, results, start_deaths, reason = Counter(), [], 0, ""

    def ready(j):
        g = inversion_group(j)
        return g is None or g in cached or g not in busy

    def finish(job, res):
        res.retries = attempts[job.index] - 1
        results.append((job.index, res))
        if on_result:
            on_result(job, res)

    try:
        while pending or running:
            while idle:  # jobs go only to started actors: one that cannot be placed gets none
                job = next((j for j in pending if ready(j)), None)
                if job is None:
                    break
                pending.remove(job)
                worker = idle.pop()
                attempts[job.index] += 1
                running[worker[0].run.remote(job)] = (job, worker)
                if inversion_group(job) not in cached:
                    busy.add(inversion_group(job))
            if not running and not starting:  # every worker died while starting
                if not watch.reachable():
                    raise ClusterLostError(watch.address, f"no worker could start ({reason}) and {watch.why}", results)
                for job in pending:
                    finish(job, JobResult(job.name, "failed", output=str(job.output), message=f"no Ray worker could start: {reason}"))
                break
            came = ray.wait(list(running) + list(starting), num_returns=1, timeout=1.0)[0]
            what = watch.lost()  # at most once a second, also while results come in
            if what:
                raise ClusterLostError(watch.address, what, results)
            if not came:
                continue
            ref = came[0]
            if ref in starting:
                a = starting.pop(ref)
                try:
                    idle.append((a, ray.get(ref)))
                except ray.exceptions.RayError as e:
                    reason, start_deaths = _death_reason(e), start_deaths + 1
                    if start_deaths <= n + retries and watch.reachable():
                        spawn()
                continue
            job, worker = running.pop(ref)
            busy.discard(inversion_group(job))
            try:
                res = ray.get(ref)
                idle.append(worker)
                if res.status == "done":
                    cached.add(inversion_group(job))
            except ray.exceptions.RayTaskError as e:  # raised by our code, not a dead worker: no retry
                res = JobResult(job.name, "failed", output=str(job.output), message=f"{type(e.cause).__name__}: {e.cause}")
                idle.append(worker)
            except ray.exceptions.RayError as e:  # the worker process died
                reason = _death_reason(e)
                discard_partial(job, worker[1])
                if "its owner has died" in str(e):  # the owner is this driver: its node is gone
                    raise ClusterLostError(watch.address, reason, results) from e
                if not watch.reachable():  # the cluster went with it (a new actor would wait on the missing GCS)
                    raise ClusterLostError(watch.address, f"a worker died ({reason}) and {watch.why}", results) from e
                spawn()
                if attempts[job.index] <= retries:
                    if on_retry:
                        on_retry(job, reason, attempts[job.index])
                    pending.appendleft(job)
                    continue
                res = JobResult(job.name, "failed", output=str(job.output),
                                message=f"its worker died {attempts[job.index]} time(s) (retry limit {retries}): {reason}")
            finish(job, res)
    except ClusterLostError:
        raise  # its actors went with it: killing one still being created would wait on the missing GCS
    except BaseException:
        _kill(ray, idle, starting, running)
        raise
    _kill(ray, idle, starting, running)
    return results

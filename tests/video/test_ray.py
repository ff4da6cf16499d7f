"""edit-video --ray: real Ray, one local cluster (2 CPUs) for the module, tiny model.

Outputs are compared bit for bit with the serial run: both run torch on one thread (conftest; a
worker's threads are its CPU share, 1 here), since the thread count changes float reduction
order and with it a few pixels by 1/255.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from tomesd_ext import cli
from tomesd_ext.video import moving_shapes, write_frames, write_mp4

try:
    import ray
except ImportError:  # pragma: no cover - CI installs Ray through the dev extra
    ray = None
    if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
        raise RuntimeError("CI must install Ray (pip install -e '.[dev]') for tests/video/test_ray.py")
needs_ray = pytest.mark.skipif(ray is None, reason="Ray is not installed: pip install 'tomesd-ext[ray]'")

REPO = Path(__file__).resolve().parents[2]
DEFAULTS = {"model": "tiny", "steps": 2, "size": 32, "cache_dir": "cache", "source_prompt": "shapes"}
GOOD = [  # a and b share one inversion; c is sdedit on a folder of frames; d inverts with another prompt
    {"name": "a", "input": "../clip.mp4", "output": "out/a", "edit_prompt": "a cat", "seed": 1},
    {"name": "b", "input": "../clip.mp4", "output": "out/b", "edit_prompt": "a dog", "seed": 2},
    {"name": "c", "input": "../frames", "output": "out/c", "edit_prompt": "a fox", "mode": "sdedit", "seed": 3},
    {"name": "d", "input": "../clip.mp4", "output": "out/d", "edit_prompt": "a cow", "source_prompt": "shapes moving",
     "vidtome": False},
]
BAD = [
    {"name": "missing", "input": "../nothing.mp4", "output": "out/m", "edit_prompt": "x"},
    {"name": "corrupt", "input": "../corrupt.mp4", "output": "out/x", "edit_prompt": "x"},
    {"name": "invalid", "input": "../clip.mp4", "output": "out/i", "edit_prompt": "x", "vidtome": {"local_ratio": 2}},
]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    write_mp4(moving_shapes(4, 32), root / "clip.mp4", 8)
    write_frames(moving_shapes(3, 40, seed=1), root / "frames")
    (root / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not a video")
    return root


def _batch(root, name, jobs):
    """A folder root/name with its own jobs file, cache and outputs (inputs shared in root)."""
    folder = root / name
    folder.mkdir()
    (folder / "jobs.yaml").write_text(yaml.safe_dump({"defaults": DEFAULTS, "jobs": jobs}))
    return folder


def _run(folder, *extra):
    rc = cli.main(["edit-video", str(folder / "jobs.yaml"), "--no-progress", "--json", str(folder / "summary.json"), *extra])
    return rc, {r["name"]: r for r in json.loads((folder / "summary.json").read_text())}


def _frames(out: Path):
    return [cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in sorted((out / "frames").glob("*.png"))]


def _same_frames(folder, reference, names):
    for n in names:
        got, want = _frames(folder / "out" / n), reference[n]
        assert len(got) == len(want) > 0, n
        assert all(np.array_equal(x, y) for x, y in zip(got, want)), f"job {n}: frames differ from the serial run"


def _leftovers(folder):
    return [p.name for p in (folder / "out").iterdir() if ".tmp-" in p.name or ".old-" in p.name]


@pytest.fixture(scope="module")
def serial(root):
    """Frames of the serial run of GOOD, per job name."""
    folder = _batch(root, "serial", GOOD)
    rc, summary = _run(folder)
    assert rc == 0 and all(r["status"] == "done" for r in summary.values())
    return {j["name"]: _frames(folder / "out" / j["name"]) for j in GOOD}


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@needs_ray
def test_ray_batch_equals_serial_and_bad_jobs_fail_alone(root, serial, cluster, capsys):
    folder = _batch(root, "ray", GOOD + BAD)
    rc, summary = _run(folder, "--ray", "--ray-workers", "2")
    assert rc == 1  # the bad jobs failed
    assert {n for n, r in summary.items() if r["status"] == "done"} == {"a", "b", "c", "d"}
    assert "does not exist" in summary["missing"]["message"]
    assert "corrupt" in summary["corrupt"]["message"]
    assert "local_ratio" in summary["invalid"]["message"]
    assert "inversion from cache" in summary["b"]["message"]  # b waited for a's inversion and reused it
    assert all(r["retries"] == 0 for r in summary.values())
    _same_frames(folder, serial, "abcd")
    assert _leftovers(folder) == [] and not (folder / "out" / "m").exists()
    assert "4 done, 0 skipped, 3 failed" in capsys.readouterr().out


def _kill_when_started(folder, job, killed):
    """Watch folder/out for the job's temporary output (.JOB.tmp-PID) and SIGKILL that worker."""
    deadline = time.time() + 120
    while time.time() < deadline and not killed:
        for p in (folder / "out").glob(f".{job}.tmp-*") if (folder / "out").is_dir() else ():
            pid = int(p.name.rsplit("-", 1)[1])
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            return
        time.sleep(0.01)


def _run_killing(folder, job):
    """_run on Ray (2 workers) while the worker that starts `job` is SIGKILLed; checks one was."""
    killed = []
    watcher = threading.Thread(target=_kill_when_started, args=(folder, job, killed))
    watcher.start()
    try:
        result = _run(folder, "--ray", "--ray-workers", "2")
    finally:
        killed.append(None)  # stops the watcher if it found nothing
        watcher.join()
    assert killed[0] not in (None, os.getpid())  # a worker process died, not this driver
    return result


@needs_ray
def test_worker_killed_mid_job_is_retried(root, serial, cluster, capsys):
    folder = _batch(root, "killed", GOOD[2:])
    rc, summary = _run_killing(folder, "c")
    assert rc == 0 and summary["c"]["status"] == "done" and summary["c"]["retries"] == 1
    assert summary["d"]["status"] == "done" and summary["d"]["retries"] == 0
    out = capsys.readouterr()
    header = next(line for line in out.out.splitlines() if line.startswith("job  "))
    assert "retries" in header  # the table gains a retries column
    assert "job c: its worker died" in out.err and "retry 1 of 2" in out.err
    _same_frames(folder, serial, "cd")
    assert _leftovers(folder) == []


FLOW = [  # video transformers (tests/video/test_flow_jobs.py): sdedit merged, flowedit, LTX sdedit
    {"name": "wan-sde", "model": "wan-tiny", "input": "../clip.mp4", "output": "out/wan-sde", "edit_prompt": "a cat",
     "strength": 0.6, "tome": {"min_tokens": 0}},
    {"name": "wan-fe", "model": "wan-tiny", "mode": "flowedit", "input": "../clip.mp4", "output": "out/wan-fe",
     "edit_prompt": "a dog", "n_max": 2},
    {"name": "ltx-sde", "model": "ltx-tiny", "input": "../frames", "output": "out/ltx-sde", "edit_prompt": "a fox"},
]


@needs_ray
def test_video_transformer_jobs_on_ray_equal_serial_and_survive_a_killed_worker(root, cluster, capsys):
    ref = _batch(root, "flow-serial", FLOW)
    rc, summary = _run(ref)
    assert rc == 0 and all(r["status"] == "done" for r in summary.values())
    reference = {j["name"]: _frames(ref / "out" / j["name"]) for j in FLOW}
    folder = _batch(root, "flow-ray", FLOW)
    rc, summary = _run_killing(folder, "wan-fe")
    assert rc == 0 and all(r["status"] == "done" for r in summary.values())
    assert summary["wan-fe"]["retries"] == 1 and "job wan-fe: its worker died" in capsys.readouterr().err
    _same_frames(folder, reference, [j["name"] for j in FLOW])
    assert _leftovers(folder) == []


def _finished(folder):
    return list((folder / "out").glob("*/job.json")) if (folder / "out").is_dir() else []


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@needs_ray
def test_interrupted_driver_then_rerun_skips_finished_and_finishes_the_rest(root, serial, cluster):
    folder = _batch(root, "resume", GOOD)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "tomesd_ext.cli", "edit-video", str(folder / "jobs.yaml"), "--no-progress",
           "--ray", cluster, "--ray-workers", "2"]
    driver = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 150
        while not _finished(folder):
            assert driver.poll() is None, driver.stderr.read().decode()[-3000:]
            assert time.time() < deadline, "no job finished"
            time.sleep(0.02)
        driver.kill()  # the driver dies; Ray ends its workers
    finally:
        driver.kill()
        driver.wait()
    finished = {p.parent.name: p.stat().st_mtime_ns for p in _finished(folder)}
    assert 0 < len(finished) < len(GOOD), finished
    # the interrupted workers go away with their driver (their temporaries are .JOB.tmp-PID)
    partial = [int(p.name.rsplit("-", 1)[1]) for p in (folder / "out").glob(".*.tmp-*")]
    deadline = time.time() + 60
    while any(_alive(pid) for pid in partial):
        assert time.time() < deadline, "the workers of a killed driver are still running"
        time.sleep(0.2)
    rc, summary = _run(folder, "--ray", "--ray-workers", "2")
    assert rc == 0
    assert {n for n, r in summary.items() if r["status"] == "skipped"} == set(finished)
    assert {n for n, r in summary.items() if r["status"] == "done"} == {j["name"] for j in GOOD} - set(finished)
    assert all((folder / "out" / n / "job.json").stat().st_mtime_ns == t for n, t in finished.items())
    _same_frames(folder, serial, "abcd")
    assert _leftovers(folder) == []


def test_missing_ray_is_one_clear_error(root, monkeypatch, capsys):
    folder = _batch(root, "noray", GOOD[:1])
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    assert cli.main(["edit-video", str(folder / "jobs.yaml"), "--ray"]) == 2
    err = capsys.readouterr().err
    assert "needs Ray" in err and "tomesd-ext[ray]" in err and "Traceback" not in err
    assert not (folder / "out").exists()


def test_ray_options_are_checked_before_any_work(root, capsys):
    folder = _batch(root, "badopts", GOOD[:1])
    assert cli.main(["edit-video", str(folder / "jobs.yaml"), "--ray-workers", "2"]) == 2
    assert "need --ray" in capsys.readouterr().err
    for bad in (["--ray", "--ray-workers", "0"], ["--ray", "--ray-retries", "-1"], ["--ray", "--ray-workers", "x"]):
        with pytest.raises(SystemExit) as e:
            cli.main(["edit-video", str(folder / "jobs.yaml"), *bad])
        assert e.value.code == 2
    assert not (folder / "out").exists()


@needs_ray
def test_unreachable_address_is_exit_2(root, capsys):
    folder = _batch(root, "badaddress", GOOD[:1])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    assert cli.main(["edit-video", str(folder / "jobs.yaml"), "--ray", f"127.0.0.1:{port}"]) == 2
    assert "no Ray cluster answers" in capsys.readouterr().err
    assert not (folder / "out").exists()


def test_discard_partial_removes_only_the_dead_workers_temporaries(tmp_path):
    """The driver knows a worker is dead even when its PID is alive on this host (another node's
    process, or a reused PID): it removes exactly that PID's temporaries of the job's output."""
    from tomesd_ext.video.jobs import discard_partial, parse_job

    job = parse_job(0, {**DEFAULTS, "name": "j", "input": "clip.mp4", "output": "out/j", "edit_prompt": "x"}, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    dead, other = out / f".j.tmp-{os.getpid()}", out / f".j.tmp-{os.getpid() + 1}"
    for p in (dead, other, out / f".jj.tmp-{os.getpid()}"):
        (p / "frames").mkdir(parents=True)
    discard_partial(job, os.getpid())
    assert sorted(p.name for p in out.iterdir()) == sorted([other.name, f".jj.tmp-{os.getpid()}"])


@pytest.mark.parametrize("address", ["foo", "10.0.0.5", "10.0.0.5:port", "10.0.0.5:0", "ray://", "http://10.0.0.5:6379"])
def test_malformed_address_is_one_error_line_and_exit_2(root, capsys, address):
    folder = _batch(root, "address-" + "".join(c if c.isalnum() else "_" for c in address), GOOD[:1])
    assert cli.main(["edit-video", str(folder / "jobs.yaml"), "--ray", address]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    assert repr(address) in err and "HOST:PORT" in err and "auto" in err  # the value and what is accepted
    assert not (folder / "out").exists()


def test_wellformed_addresses_are_accepted():
    from tomesd_ext.video.ray_runner import check_address

    for address in ("auto", "local", "127.0.0.1:6379", "head-node:6379", "[::1]:6379", "ray://10.0.0.5:10001"):
        check_address(address)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


@needs_ray
def test_cluster_lost_mid_run_is_one_error_line_a_summary_and_exit_3(root, tmp_path, capsys):
    """A real cluster started by another process (`ray start --head` on loopback, its own temp
    dir and session) that goes away while a `--ray auto` driver runs on it: every process of the
    cluster gets SIGTERM, as `ray stop` sends (only this cluster's processes: `ray stop` itself
    would stop every Ray of this user on the machine)."""
    ray_cli = Path(sys.executable).with_name("ray")
    if not ray_cli.exists():
        pytest.skip(f"no ray command next to {sys.executable}")
    # one worker runs them in turn: the cluster is stopped when the first is done, with several left
    jobs = GOOD + [{"name": f"s{i}", "input": "../frames", "output": f"out/s{i}", "edit_prompt": "a fox", "mode": "sdedit",
                    "seed": 10 + i} for i in range(4)]
    folder = _batch(root, "lost", jobs)
    port, temp = _free_port(), Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # Ray's socket paths must be short
    # a token of its own (not ~/.ray/auth_token, which any local ray.init may create or replace)
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": uuid.uuid4().hex}
    head = subprocess.Popen(
        [str(ray_cli), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "2",
         "--include-dashboard=false", "--disable-usage-stats", "--temp-dir", str(temp)], env={**os.environ, **auth},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # its own process group
    env = {**os.environ, **auth, "RAY_ADDRESS": f"127.0.0.1:{port}",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    driver = None
    try:
        deadline = time.time() + 60
        while not _answers(port):
            assert head.poll() is None and time.time() < deadline, "the head node did not start"
            time.sleep(0.2)
        cmd = [sys.executable, "-m", "tomesd_ext.cli", "edit-video", str(folder / "jobs.yaml"), "--no-progress",
               "--ray", "auto", "--ray-workers", "1", "--json", str(folder / "summary.json")]
        driver = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while not _finished(folder):
            assert driver.poll() is None, driver.communicate()[1][-3000:]
            assert time.time() < deadline, "no job finished"
            time.sleep(0.05)
        os.killpg(head.pid, signal.SIGTERM)  # the cluster goes away mid-run
        out, err = driver.communicate(timeout=60)  # Ray alone would end the driver after 60 s, without a summary
    finally:
        for proc in (driver, head):
            if proc is not None and proc.poll() is None:
                proc.kill()
        try:
            os.killpg(head.pid, signal.SIGKILL)  # what is left of the cluster
        except ProcessLookupError:
            pass
        head.wait(timeout=30)
        shutil.rmtree(temp, ignore_errors=True)
    assert driver.returncode == 3, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith("error: the Ray cluster at ") and f":{port} was lost mid-run" in errors[0], err[-3000:]
    assert "--ray auto" in errors[0] and "a rerun runs the rest" in errors[0]
    summary = {r["name"]: r for r in json.loads((folder / "summary.json").read_text())}
    done = {n for n, r in summary.items() if r["status"] == "done"}
    not_done = {n for n, r in summary.items() if r["status"] == "not done"}
    assert done and not_done and done | not_done == {j["name"] for j in jobs}, summary
    assert f"{len(done)} done, 0 skipped, 0 failed, {len(not_done)} not done" in out
    assert done <= {p.parent.name for p in _finished(folder)}  # done is complete on disk
    # a rerun (here serial: the cluster is gone) skips what finished and runs the rest
    again = [min(done), min(not_done)]
    rc, rerun = _run(folder, "--only", again[0], "--only", again[1])
    assert rc == 0 and rerun[again[0]]["status"] == "skipped" and rerun[again[1]]["status"] in ("done", "skipped")

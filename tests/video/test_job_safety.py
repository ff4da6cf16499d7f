"""edit-video never deletes what it did not write, refuses bad jobs before any model loads, and
never reports success for a job that did not run as described."""

import json
import os
import subprocess

import pytest
import yaml

from tomesd_ext import cli
from tomesd_ext.video import moving_shapes, write_frames, write_mp4
from tomesd_ext.video.jobs import JobError, load_jobs_file, parse_job

DEFAULTS = {"model": "tiny", "steps": 1, "size": 32, "cache_dir": "cache", "source_prompt": "shapes", "edit_prompt": "a cat"}


def _run_cli(jobs_file, *extra):
    return cli.main(["edit-video", str(jobs_file), "--no-progress", *extra])


def _setup(tmp_path, jobs):
    write_mp4(moving_shapes(2, 32), tmp_path / "clip.mp4", 8)
    write_frames(moving_shapes(2, 32), tmp_path / "frames")
    f = tmp_path / "jobs.yaml"
    f.write_text(yaml.safe_dump({"defaults": DEFAULTS, "jobs": jobs}))
    return f


def _summary(tmp_path, jobs_file, *extra):
    rc = _run_cli(jobs_file, "--json", str(tmp_path / "summary.json"), *extra)
    return rc, {r["name"]: r for r in json.loads((tmp_path / "summary.json").read_text())}


def _tree(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if "summary.json" not in p.name)


@pytest.mark.parametrize(
    "job, message",
    [
        ({"input": "clip.mp4", "output": "clip.mp4"}, "is the input"),
        ({"input": "frames", "output": "frames"}, "is the input"),
        ({"input": "clip.mp4", "output": "."}, "contains the input"),
        ({"input": "frames", "output": "frames/edited"}, "lies inside the input"),
        ({"input": "clip.mp4", "output": "jobs.yaml"}, "is the jobs file"),
        ({"input": "clip.mp4", "output": "cache/x"}, "lies inside the cache"),
    ],
)
def test_output_overlapping_an_input_is_refused_and_nothing_is_deleted(tmp_path, job, message):
    f = _setup(tmp_path, [{"name": "j", **job}])
    before = _tree(tmp_path)
    rc, summary = _summary(tmp_path, f)
    assert rc == 1 and summary["j"]["status"] == "failed"
    assert message in summary["j"]["message"] and "output" in summary["j"]["message"]
    assert _tree(tmp_path) == before  # input video, frames, jobs.yaml all still there


def test_existing_folder_with_other_files_is_refused(tmp_path):
    f = _setup(tmp_path, [{"name": "j", "input": "clip.mp4", "output": "mine"}])
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.txt").write_text("precious")
    rc, summary = _summary(tmp_path, f)
    assert rc == 1 and "not the output of job" in summary["j"]["message"]
    assert (tmp_path / "mine" / "thesis.txt").read_text() == "precious"
    # an output of another job (its job.json names another job) is not ours either
    (tmp_path / "mine" / "thesis.txt").unlink()
    (tmp_path / "mine" / "job.json").write_text(json.dumps({"name": "other"}))
    rc, summary = _summary(tmp_path, f, "--force")
    assert rc == 1 and (tmp_path / "mine" / "job.json").exists()


def test_previous_output_of_the_same_job_is_replaced_with_force(tmp_path):
    f = _setup(tmp_path, [{"name": "j", "input": "clip.mp4", "output": "out/j"}])
    rc, summary = _summary(tmp_path, f)
    assert rc == 0 and summary["j"]["status"] == "done"
    first = json.loads((tmp_path / "out" / "j" / "job.json").read_text())["seconds"]
    rc, summary = _summary(tmp_path, f, "--force")
    assert rc == 0 and summary["j"]["status"] == "done"
    assert json.loads((tmp_path / "out" / "j" / "job.json").read_text())["seconds"] != first
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["j"]  # no temporaries, no trash


def test_two_jobs_with_one_output_are_refused_naming_both(tmp_path):
    f = _setup(tmp_path, [
        {"name": "a", "input": "clip.mp4", "output": "out/same"},
        {"name": "b", "input": "frames", "output": "out/../out/same"},
    ])
    rc, summary = _summary(tmp_path, f)
    assert rc == 1
    assert summary["a"]["status"] == "done"
    assert summary["b"]["status"] == "failed"
    assert "job 1 (a)" in summary["b"]["message"] and "job 2 (b)" in summary["b"]["message"]


def test_nested_outputs_are_refused(tmp_path):
    f = _setup(tmp_path, [
        {"name": "a", "input": "clip.mp4", "output": "out"},
        {"name": "b", "input": "clip.mp4", "output": "out/b"},
    ])
    rc, summary = _summary(tmp_path, f)
    assert rc == 1 and summary["b"]["status"] == "failed" and "inside the output of job 1 (a)" in summary["b"]["message"]


def test_output_inside_another_jobs_input_is_refused(tmp_path):
    f = _setup(tmp_path, [
        {"name": "a", "input": "frames", "output": "out/a"},
        {"name": "b", "input": "clip.mp4", "output": "frames/b"},
    ])
    before = sorted(p.name for p in (tmp_path / "frames").iterdir())
    rc, summary = _summary(tmp_path, f)
    assert summary["b"]["status"] == "failed" and "lies inside the input of job 1 (a)" in summary["b"]["message"]
    assert sorted(p.name for p in (tmp_path / "frames").iterdir()) == before


def _dead_pid():
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_rerun_clears_stale_temporaries_of_its_jobs(tmp_path):
    f = _setup(tmp_path, [{"name": "j", "input": "clip.mp4", "output": "out/j"}])
    (tmp_path / "out").mkdir()
    stale = tmp_path / "out" / f".j.tmp-{_dead_pid()}"
    stale.mkdir()
    live = tmp_path / "out" / f".j.tmp-{os.getpid()}x"  # not one of our names: left alone
    live.mkdir()
    rc, summary = _summary(tmp_path, f)
    assert rc == 0 and not stale.exists() and live.exists()


def test_null_negative_prompt_keeps_classifier_free_guidance(tmp_path):
    """`negative_prompt:` left empty means the empty prompt, not "no CFG" (docs/errors.md)."""
    job = parse_job(0, {**DEFAULTS, "input": "clip.mp4", "output": "o", "negative_prompt": None}, tmp_path)
    assert job.settings.negative_prompt == ""
    from tomesd_ext.core.options import OptionError
    from tomesd_ext.video import EditSettings

    with pytest.raises(OptionError, match="negative_prompt"):
        EditSettings(negative_prompt=None).check()


@pytest.mark.parametrize(
    "fields, field",
    [
        ({"frames": {"start": "abc"}}, "frames.start"),
        ({"frames": {"stride": 1.5}}, "frames.stride"),
        ({"frames": {"max": 0}}, "frames.max"),
        ({"mode": "sdedit", "seed": 2**64}, "seed"),
        ({"fps": -5}, "fps"),
        ({"fps": "fast"}, "fps"),
        ({"edit_prompt": 123}, "edit_prompt"),
        ({"source_prompt": ["a", "b"]}, "source_prompt"),
        ({"negative_prompt": 5}, "negative_prompt"),
        ({"model": 15}, "model"),
    ],
)
def test_field_types_are_checked_at_parse_time(tmp_path, fields, field):
    with pytest.raises(JobError, match=rf"job 1 \(j\): {field}"):
        parse_job(0, {**DEFAULTS, "name": "j", "input": "clip.mp4", "output": "o", **fields}, tmp_path)


def test_binary_jobs_file_is_a_clear_error(tmp_path, capsys):
    f = tmp_path / "jobs.yaml"
    f.write_bytes(b"\xff\xfe\x00\x81binary")
    assert _run_cli(f) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "not a text" in err
    with pytest.raises(JobError):
        load_jobs_file(f)


def test_json_summary_path_is_checked_before_any_job_runs(tmp_path, capsys):
    f = _setup(tmp_path, [{"name": "j", "input": "clip.mp4", "output": "out/j"}])
    (tmp_path / "adir").mkdir()
    assert _run_cli(f, "--json", str(tmp_path / "adir")) == 2
    assert "--json" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    (tmp_path / "afile").write_text("")
    assert _run_cli(f, "--json", str(tmp_path / "afile" / "s.json")) == 2
    assert not (tmp_path / "out").exists()


def test_input_inside_an_earlier_jobs_output_is_refused(tmp_path):
    """The earlier job replaces its output folder, so a later job may not read from inside it."""
    f = _setup(tmp_path, [
        {"name": "a", "input": "clip.mp4", "output": "out/a"},
        {"name": "b", "input": "out/a/frames", "output": "out/b"},
    ])
    rc, summary = _summary(tmp_path, f)
    assert summary["a"]["status"] == "done" and summary["b"]["status"] == "failed"
    assert "overlaps the output of job 1 (a)" in summary["b"]["message"]


def test_unknown_only_name_is_an_error_before_any_job_runs(tmp_path, capsys):
    f = _setup(tmp_path, [{"name": "ok", "input": "clip.mp4", "output": "out/ok"},
                          {"input": "frames", "output": "out/second"},  # named after its output folder
                          {"name": "bad", "input": "clip.mp4", "output": "out/bad", "steps": -1}])
    assert _run_cli(f, "--only", "ok", "--only", "nosuchjob", "--only", "nor-this") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --only") and "Traceback" not in err
    assert "'nosuchjob', 'nor-this'" in err  # the unknown names
    assert "'ok', 'second', 'bad'" in err  # the known ones, a job that failed to parse included
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()

"""The benches' one timing meter and one memory meter, the kernel micro-bench and the methods
folded in from the old script bench (plan reuse, forced kernel backend)."""

import os

import pytest
import torch

from tomesd_ext.bench.memory import PeakMemory
from tomesd_ext.bench.timing import interleaved, round_order, summary, timed


def test_round_orders():
    items = ["a", "b", "c"]
    assert [round_order(items, i) for i in range(2)] == [items, items]
    assert [round_order(items, i, "rotate") for i in range(4)] == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    assert [round_order(items, i, "reverse") for i in range(3)] == [["a", "b", "c"], ["c", "b", "a"], ["a", "b", "c"]]
    with pytest.raises(ValueError, match="order"):
        round_order(items, 0, "random")


def test_interleaved_calls_in_round_order_after_warmup():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "ab"}
    seconds = interleaved(fns, repeats=2, warmup=1, order="reverse")
    assert calls == ["a", "b", "a", "b", "b", "a"]
    assert {k: len(v) for k, v in seconds.items()} == {"a": 2, "b": 2}
    assert all(s >= 0 for v in seconds.values() for s in v)


def test_timed_returns_result_and_seconds():
    result, seconds = timed(lambda: sum(range(1000)))
    assert result == 499500 and 0 <= seconds < 5
    assert summary([3.0, 1.0, 2.0]) == {"seconds_median": 2.0, "seconds_min": 1.0, "seconds_max": 3.0}


def test_cpu_clock_does_not_count_waiting():
    """clock="cpu" counts this process's CPU work: a sleep (waiting, as for a core on a loaded
    machine) adds next to nothing, while the wall clock counts it."""
    import time

    assert timed(lambda: time.sleep(0.3), clock="cpu")[1] < 0.15
    assert timed(lambda: time.sleep(0.3))[1] >= 0.3


def test_peak_memory_sees_a_transient_cpu_allocation():
    with PeakMemory("cpu", interval=0.001, collect=True) as mem:
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB, written so the pages are resident
        del x
    assert mem.device.type == "cpu" and mem.mb == mem.rss_mb
    assert mem.rss_mb >= 48  # the peak, although the tensor is freed before the block ends
    assert (mem.cuda_mb is None) == (not torch.cuda.is_available())
    with PeakMemory("cpu") as idle:
        pass
    assert idle.rss_mb < 48


def test_merged_level_per_architecture():
    from tomesd_ext.bench.micro import merged_level
    from tomesd_ext.models import build_unet

    assert merged_level(build_unet("tiny").config, 512) == (64, build_unet("tiny").config.block_out_channels[0])
    sdxl = build_unet("tiny-sdxl").config  # first level has no transformer blocks
    level = next(i for i, kind in enumerate(sdxl.down_block_types) if "CrossAttn" in kind)
    assert level > 0 and merged_level(sdxl, 1024) == (1024 // 8 // 2**level, sdxl.block_out_channels[level])


def test_micro_reports_operator_times(tiny_unet):
    from tomesd_ext.bench.micro import micro, micro_table

    row = micro(tiny_unet.config, 256, batch=2, ratio=0.5, device="cpu", dtype=torch.float32, repeats=2)
    assert row["tokens"] == 32 * 32 and "error_torch" not in row
    for key in ("plan_ms_torch", "merge_unmerge_ms_torch", "sort_ms", "topk_unsorted_ms"):
        assert row[key] > 0
    assert "plan_ms_cuda" not in row  # CPU: torch backend only
    assert "256px" in micro_table([row])


@pytest.mark.parametrize("name", ["tome-level", "tome-level-k2", "tome-torch"])
def test_folded_methods_patch_and_restore(name, tiny_unet, tiny_inputs):
    from tomesd_ext.bench.methods import MethodContext, get_method

    _, t, c = tiny_inputs
    x = torch.randn(2, 4, 48, 48, generator=torch.Generator().manual_seed(0))  # 2304 tokens: above the auto-skip
    with torch.no_grad():
        ref = tiny_unet(x, t, c).sample
        method = get_method(name)
        before = os.environ.get("TOMESD_EXT_KERNELS")
        method.apply(tiny_unet, 0.5, MethodContext(seed=0, max_downsample=1))
        merged = tiny_unet(x, t, c).sample
        method.remove(tiny_unet)
        assert os.environ.get("TOMESD_EXT_KERNELS") == before
        assert torch.equal(tiny_unet(x, t, c).sample, ref)
    assert not torch.equal(merged, ref)


def test_cli_micro_option_writes_micro_rows(tmp_path):
    import json

    from tomesd_ext import cli

    out = tmp_path / "r.json"
    argv = ["bench", "--model", "tiny", "--resolution", "128", "--ratios", "0.5", "--methods", "tome-level", "--inputs", "noise",
            "--repeats", "1", "--warmup", "0", "--no-progress", "--micro", "--json", str(out)]
    assert cli.main(argv) == 0
    doc = json.loads(out.read_text())
    assert doc["header"]["micro"] is True
    assert [(m["resolution"], m["ratio"]) for m in doc["micro"]] == [(128, 0.5)]
    assert [r["method"] for r in doc["rows"]] == ["baseline", "tome-level"]

"""Side by side with tomesd 0.1.3 on the SD1.5-topology tiny model, same settings."""

import pytest
import torch

from tomesd_ext import apply_tome, remove_tome
from tomesd_ext.models import build_unet, sharpen_self_attention

from conftest import run, unet_inputs

tomesd = pytest.importorskip("tomesd", reason="tomesd (dev extra) is not installed")


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.7])
def test_deviation_from_unmerged_no_more_than_tomesd(ratio):
    """Mean relative error over several inputs and seeds, on the sharpened-attention variant
    (docs/bench.md, "Sharpened attention") so that the error ranks methods."""
    unet = sharpen_self_attention(build_unet("tiny", seed=0).eval())
    ours, theirs = [], []
    for seed in range(16):
        inputs = unet_inputs(unet, batch=2, hw=(32, 32), seed=seed)
        base = run(unet, inputs)
        apply_tome(unet, ratio, seed=seed, max_downsample=1)
        ours.append(float((run(unet, inputs) - base).norm() / base.norm()))
        remove_tome(unet)
        torch.manual_seed(seed)
        tomesd.apply_patch(unet, ratio=ratio, max_downsample=1)
        theirs.append(float((run(unet, inputs) - base).norm() / base.norm()))
        tomesd.remove_patch(unet)
    ours_mean, theirs_mean = sum(ours) / len(ours), sum(theirs) / len(theirs)
    print(f"ratio {ratio}: ours {ours_mean:.4f}, tomesd {theirs_mean:.4f}")
    assert ours_mean <= theirs_mean

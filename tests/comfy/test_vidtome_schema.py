"""Pure-Python tests of the VidToMe node, its attention stand-in and the shipped video workflow
(no ComfyUI needed: these run in CI)."""

import pytest
import torch

import nodes
from comfy_env import load_workflow
from nodes.vidtome import TomesdExtVidToMe
from tomesd_ext.comfy.vidtome import VidToMeAttention, vidtome_state
from tomesd_ext.core import OptionError, VidToMeOptions, chunk_draw, chunk_frames, chunked_temporal_attention, temporal_attention

INPUTS = ["model", "chunk_size", "local_ratio", "global_ratio", "max_downsample", "seed", "global_rand",
          "align_batch", "start_percent", "end_percent"]


def _widgets(**over):
    spec = TomesdExtVidToMe.INPUT_TYPES()["required"]
    values = {k: v[1]["default"] for k, v in spec.items() if k != "model"}
    values.update(over)
    return values


def test_registered_with_display_name_and_schema():
    assert nodes.NODE_DEFINITIONS["TomesdExtVidToMe"] is TomesdExtVidToMe
    assert nodes.DISPLAY_NAMES["TomesdExtVidToMe"] == "Video Token Merging (VidToMe, tomesd-ext)"
    required = TomesdExtVidToMe.INPUT_TYPES()["required"]
    assert list(required) == INPUTS
    for name, (kind, spec) in required.items():
        assert spec.get("tooltip"), name
        if kind in ("INT", "FLOAT"):
            assert spec["min"] <= spec["default"] <= spec["max"], name
    assert required["local_ratio"][1]["max"] < 1.0 and required["global_ratio"][1]["max"] < 1.0
    assert required["max_downsample"][0] == ["1", "2", "4", "8", "16", "32", "64"]  # core.VIDTOME_OPTIONS
    assert TomesdExtVidToMe.CATEGORY == "model_patches/token_merging"


def test_options_match_apply_vidtome_defaults_and_errors_name_the_limit():
    w = _widgets(seed=7)
    opts = TomesdExtVidToMe.options(**{k: w[k] for k in w if not k.endswith("percent")})
    assert opts == VidToMeOptions.create(seed=7)  # the node's defaults are apply_vidtome's
    for bad, text in (({"chunk_size": 0}, "chunk_size"), ({"local_ratio": 1.0}, "local_ratio"),
                      ({"global_ratio": -0.1}, "global_ratio"), ({"max_downsample": "3"}, "max_downsample"),
                      ({"global_rand": 1.5}, "global_rand")):
        values = {k: v for k, v in _widgets(**bad).items() if not k.endswith("percent")}
        with pytest.raises(OptionError, match=text):
            TomesdExtVidToMe.options(**values)


def test_validate_inputs():
    assert TomesdExtVidToMe.VALIDATE_INPUTS(start_percent=0.2, end_percent=0.8) is True
    msg = TomesdExtVidToMe.VALIDATE_INPUTS(start_percent=0.9, end_percent=0.1)
    assert isinstance(msg, str) and "start_percent" in msg
    msg = TomesdExtVidToMe.VALIDATE_INPUTS(start_percent=0.0, end_percent=1.5)
    assert isinstance(msg, str) and "end_percent=1.5 is out of range" in msg
    # named inputs only: ComfyUI skips its own min/max check of inputs VALIDATE_INPUTS receives
    import inspect

    params = inspect.signature(TomesdExtVidToMe.VALIDATE_INPUTS).parameters.values()
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


class FakeAttention(torch.nn.Module):
    """ComfyUI CrossAttention's call signature; self-attention of x with a fixed projection."""

    def __init__(self, dim=8):
        super().__init__()
        self.to_q = torch.nn.Linear(dim, dim, bias=False)
        torch.nn.init.normal_(self.to_q.weight, generator=torch.Generator().manual_seed(0))
        self.calls = []

    def forward(self, x, context=None, value=None, mask=None, transformer_options={}):  # noqa: B006
        self.calls.append(x.shape)
        kv = x if context is None else context
        w = torch.softmax(self.to_q(x) @ kv.transpose(1, 2), -1)
        return w @ kv


def _state(opts, frames=5, samples=2, hw=(4, 4), t=500.0):
    st = vidtome_state(opts)
    st.begin_call(torch.zeros(samples * frames, 4, *hw), torch.full((samples * frames,), t), None)
    return st


def test_attention_stand_in_runs_the_chunked_core_on_self_attention_only():
    opts = VidToMeOptions.create(chunk_size=2, seed=3)
    inner = FakeAttention()
    st = _state(opts)
    stand_in = VidToMeAttention(inner, st)
    assert dict(stand_in.named_parameters()) == dict(inner.named_parameters())  # same parameter paths
    x = torch.randn(10, 16, 8, generator=torch.Generator().manual_seed(1))
    options = {"cond_or_uncond": [1, 0]}
    out = stand_in(x, transformer_options=options)
    assert torch.equal(out, chunked_temporal_attention(x, 2, inner, opts, 500.0))
    assert not torch.allclose(out, inner(x), atol=1e-4)
    assert torch.equal(stand_in(x, context=x, value=x, transformer_options=options), out)  # another node's attn1_patch
    ctx = torch.randn(10, 3, 8)
    assert torch.equal(stand_in(x, context=ctx, transformer_options=options), inner(x, context=ctx))
    st.end_call()
    assert torch.equal(stand_in(x, transformer_options=options), inner(x))  # outside a UNet call / window


def test_attention_stand_in_skips_unmerged_levels_and_uneven_batches():
    opts = VidToMeOptions.create(chunk_size=2, seed=3, max_downsample=1)
    inner = FakeAttention()
    stand_in = VidToMeAttention(inner, _state(opts, hw=(8, 8)))
    x16 = torch.randn(10, 16, 8)  # 4x4 tokens = downsample 2 of an 8x8 latent: not merged
    assert torch.equal(stand_in(x16, transformer_options={"cond_or_uncond": [1, 0]}), inner(x16))
    x64 = torch.randn(9, 64, 8)  # 9 rows cannot split into 2 halves
    assert torch.equal(stand_in(x64, transformer_options={"cond_or_uncond": [1, 0]}), inner(x64))


def test_chunked_attention_is_temporal_attention_per_chunk_with_the_global_set_carried():
    opts = VidToMeOptions.create(chunk_size=3, seed=11)
    attn = FakeAttention()
    S, F, step = 2, 7, 321.0
    x = torch.randn(S * F, 16, 8, generator=torch.Generator().manual_seed(2))
    out = chunked_temporal_attention(x, S, attn, opts, step)
    expected, glob = torch.empty_like(out), None
    chunks = chunk_frames(F, opts.chunk_size, opts.seed, step)
    assert sorted(f for c in chunks for f in c) == list(range(F))
    for frames in chunks:
        rows = [s * F + f for s in range(S) for f in frames]
        y, glob = temporal_attention(x[rows], S, attn, opts, chunk_draw(opts.seed, step, tuple(frames), opts.global_rand), glob)
        expected[rows] = y
    assert torch.equal(out, expected)
    with pytest.raises(ValueError, match="multiple"):
        chunked_temporal_attention(x[:13], S, attn, opts, step)


def test_one_frame_chunks_with_nothing_merged_are_per_frame_attention():
    opts = VidToMeOptions.create(chunk_size=1, local_ratio=0.0, global_ratio=0.0, seed=0)
    attn = FakeAttention()
    x = torch.randn(10, 16, 8)
    torch.testing.assert_close(chunked_temporal_attention(x, 2, attn, opts, 1.0), attn(x), rtol=0, atol=1e-6)


def test_vid2vid_workflow_files():
    api = load_workflow("sd15_vid2vid_vidtome.api.json")
    ui = load_workflow("sd15_vid2vid_vidtome.json")
    by_type = {v["class_type"]: (k, v["inputs"]) for k, v in api.items()}
    ckpt = load_workflow("sd15_txt2img_tome.api.json")["1"]["inputs"]["ckpt_name"]
    assert by_type["CheckpointLoaderSimple"][1]["ckpt_name"] == ckpt
    for chain in (("LoadVideo", "GetVideoComponents"), ("GetVideoComponents", "ImageScale"), ("ImageScale", "VAEEncode"),
                  ("VAEEncode", "KSampler"), ("TomesdExtVidToMe", "KSampler"), ("KSampler", "VAEDecode"),
                  ("VAEDecode", "CreateVideo"), ("CreateVideo", "SaveVideo")):
        src, dst = by_type[chain[0]][0], by_type[chain[1]][1]
        assert any(isinstance(v, list) and v[0] == src for v in dst.values()), chain
    assert 0 < by_type["KSampler"][1]["denoise"] < 1  # SDEdit: keep the input video's structure
    vid = by_type["TomesdExtVidToMe"][1]
    values = {k: v for k, v in vid.items() if k != "model"}
    TomesdExtVidToMe.options(**{k: v for k, v in values.items() if not k.endswith("percent")})
    assert TomesdExtVidToMe.VALIDATE_INPUTS(vid["start_percent"], vid["end_percent"]) is True
    node = next(n for n in ui["nodes"] if n["type"] == "TomesdExtVidToMe")
    assert node["widgets_values"] == [values[k] for k in INPUTS[1:]]

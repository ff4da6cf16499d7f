"""edit-video with a single-file Wan 2.1 transformer (`model:` a .safetensors file in the original
Wan key layout, as ComfyUI's wan2.1_t2v_*.safetensors) inside the Wan pipeline named by
`pipeline:` (a built-in or a local diffusers folder): the file's weights are the ones used, the
edit equals the one of the pipeline holding the same transformer, and the field errors name it."""

import json

import numpy as np
import pytest
import torch
import yaml

from tomesd_ext import cli
from tomesd_ext.video import moving_shapes, write_mp4
from tomesd_ext.video.jobs import JobError, parse_job
from tomesd_ext.video.models import backend_of, load_pipeline

# diffusers' WanTransformer3DModel names -> the original Wan layout (the Wan repository's and
# ComfyUI's WanModel: self_attn / cross_attn with q k v o, norm3 the cross-attention norm,
# ffn.0 / ffn.2, modulation, head.head / head.modulation, the embeddings as Sequentials)
TO_ORIGINAL = (
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("attn1", "self_attn"), ("attn2", "cross_attn"),
    (".to_out.0.", ".o."), (".to_q.", ".q."), (".to_k.", ".k."), (".to_v.", ".v."),
    ("ffn.net.0.proj", "ffn.0"), ("ffn.net.2", "ffn.2"), (".norm2.", ".norm3."),
    ("proj_out", "head.head"),
)
ORIGINAL_KEYS_OF_A_BLOCK = {  # a block of the original layout (bias and weight where both exist)
    f"{part}.{p}" for part in ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q",
                               "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2", "norm3")
    for p in ("weight", "bias")
} | {"self_attn.norm_q.weight", "self_attn.norm_k.weight", "cross_attn.norm_q.weight", "cross_attn.norm_k.weight",
     "modulation"}


def write_wan_file(transformer, path, prefix="", dtype=torch.float32):
    """A diffusers Wan transformer's weights as a single file in the original key layout."""
    from safetensors.torch import save_file

    out = {}
    for name, value in transformer.state_dict().items():
        key = "head.modulation" if name == "scale_shift_table" else name.replace("scale_shift_table", "modulation")
        for new, old in TO_ORIGINAL:
            key = key.replace(new, old)
        out[prefix + key] = value.to(dtype).contiguous()
    save_file(out, str(path))
    return out


def _tiny(seed=0):
    from tomesd_ext.models.video_pipeline import build_video_pipeline

    return build_video_pipeline("wan-tiny", seed=seed)


def test_the_written_layout_is_the_original_one(tmp_path):
    keys = set(write_wan_file(_tiny().transformer, tmp_path / "wan.safetensors"))
    assert {k.split(".", 2)[2] for k in keys if k.startswith("blocks.0.")} == ORIGINAL_KEYS_OF_A_BLOCK
    assert {k for k in keys if not k.startswith("blocks.")} == {
        "patch_embedding.weight", "patch_embedding.bias", "head.head.weight", "head.head.bias", "head.modulation",
        *(f"{m}.{i}.{p}" for m, i in (("text_embedding", 0), ("text_embedding", 2), ("time_embedding", 0),
                                      ("time_embedding", 2), ("time_projection", 1)) for p in ("weight", "bias"))}


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_the_file_weights_replace_the_pipeline_transformer(tmp_path, prefix):
    """Bare keys and ComfyUI's checkpoint prefix; fp16 in the file, float32 loaded."""
    other = _tiny(seed=5).transformer  # not the built-in's weights
    f = tmp_path / "wan.safetensors"
    write_wan_file(other, f, prefix, torch.float16)
    assert backend_of(str(f)) == "flow"
    pipe = load_pipeline(str(f), pipeline="wan-tiny")
    loaded, builtin = pipe.transformer.state_dict(), _tiny().transformer.state_dict()
    assert set(loaded) == set(builtin)
    for name, value in other.state_dict().items():
        assert loaded[name].dtype == torch.float32
        assert torch.equal(loaded[name], value.half().float()), name
    assert not torch.equal(loaded["patch_embedding.weight"], builtin["patch_embedding.weight"])


def test_a_file_of_another_width_is_an_error_naming_both(tmp_path):
    from diffusers import WanTransformer3DModel

    config = dict(_tiny().transformer.config)
    config["ffn_dim"] = 24  # the pipeline's is 48
    wider = WanTransformer3DModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    f = tmp_path / "wan.safetensors"
    write_wan_file(wider, f)
    with pytest.raises(ValueError, match="does not fit pipeline 'wan-tiny'"):
        load_pipeline(str(f), pipeline="wan-tiny")


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """Two jobs each on the built-in wan-tiny and on a diffusers folder (wan-tiny saved): the
    pipeline itself, and its transformer as a single file in the pipeline (folder: in the folder)."""
    root = tmp_path_factory.mktemp("wanfile")
    pipe = _tiny()
    write_wan_file(pipe.transformer, root / "wan_tiny.safetensors", dtype=torch.float32)
    pipe.save_pretrained(root / "wan-folder")
    write_mp4([f[:40, :56] for f in moving_shapes(5, 64)], root / "clip.mp4", 8)
    base = {"input": "clip.mp4", "edit_prompt": "a cat", "steps": 2, "strength": 0.6,
            "tome": {"ratio": 0.5, "min_tokens": 0}}
    jobs = [
        {**base, "name": "builtin", "model": "wan-tiny"},
        {**base, "name": "builtin-file", "model": str(root / "wan_tiny.safetensors"), "pipeline": "wan-tiny"},
        {**base, "name": "folder", "model": str(root / "wan-folder")},
        {**base, "name": "folder-file", "model": str(root / "wan_tiny.safetensors"), "pipeline": str(root / "wan-folder")},
    ]
    for j in jobs:
        j["output"] = f"out/{j['name']}"
    f = root / "jobs.yaml"
    f.write_text(yaml.safe_dump({"jobs": jobs}))
    rc = cli.main(["edit-video", str(f), "--no-progress", "--json", str(root / "s1.json")])
    return root, f, rc


def _frames(folder):
    import cv2

    return np.stack([cv2.imread(str(p)) for p in sorted((folder / "frames").glob("*.png"))])


def test_single_file_jobs_equal_the_pipeline_holding_the_same_transformer(batch):
    root, f, rc = batch
    summary = {r["name"]: r for r in json.loads((root / "s1.json").read_text())}
    assert rc == 0, summary
    for name, r in summary.items():
        assert r["status"] == "done" and r["frames"] == 5 and r["size"] == "56x40", r
        assert "; merged" in r["message"], r["message"]
    out = {name: _frames(root / "out" / name) for name in summary}
    assert np.array_equal(out["builtin"], out["builtin-file"])
    assert np.array_equal(out["folder"], out["folder-file"])
    rc = cli.main(["edit-video", str(f), "--no-progress", "--json", str(root / "s2.json")])
    assert rc == 0 and [r["status"] for r in json.loads((root / "s2.json").read_text())] == ["skipped"] * 4


BASE = {"input": "clip.mp4", "output": "out/x", "edit_prompt": "a cat"}


def test_pipeline_field_errors_name_it(tmp_path):
    f = tmp_path / "wan.safetensors"
    write_wan_file(_tiny().transformer, f)

    def refused(fields, message):
        with pytest.raises(JobError, match=message):
            parse_job(0, {**BASE, **fields}, tmp_path)

    refused({"model": str(f)}, r"^job 1: model .* is a single-file Wan transformer: set `pipeline`")
    refused({"model": "wan-tiny", "pipeline": "wan-tiny"}, r"^job 1: pipeline 'wan-tiny' applies only when model is a single-file")
    refused({"model": str(f), "pipeline": "ltx-tiny"}, r"^job 1: pipeline 'ltx-tiny' is neither a local Wan diffusers folder")
    refused({"model": str(f), "pipeline": str(tmp_path)}, r"^job 1: pipeline .* is neither a local Wan diffusers folder")
    refused({"model": str(f), "pipeline": 3}, r"^job 1: pipeline must be a string")
    pair = tmp_path / "a14b"  # a Wan 2.2 A14B folder's index: refused before anything loads
    pair.mkdir()
    (pair / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline", "transformer": ["diffusers", "x"],
                                                       "transformer_2": ["diffusers", "WanTransformer3DModel"]}))
    refused({"model": str(f), "pipeline": str(pair)}, r"^job 1: pipeline .* holds two transformers \(Wan 2.2 A14B\)")
    (pair / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline", "transformer_2": [None, None]}))
    assert parse_job(0, {**BASE, "model": str(f), "pipeline": str(pair)}, tmp_path).spec["pipeline"] == str(pair)
    job = parse_job(0, {**BASE, "model": str(f), "pipeline": "wan-tiny"}, tmp_path)
    assert job.settings.mode == "sdedit" and job.spec["pipeline"] == "wan-tiny"

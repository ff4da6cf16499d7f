"""edit-video with a single-file video transformer (`model:` a .safetensors file in the family's
original key layout: Wan 2.1 / 2.2 TI2V-5B as ComfyUI's wan2.1_t2v_*.safetensors, LTX-Video as
Lightricks' ltx-video-2b-v0.9*.safetensors) inside the pipeline of that family named by
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


# diffusers' LTXVideoTransformer3DModel names -> Lightricks' original layout (the rest is shared)
LTX_TO_ORIGINAL = (("proj_in", "patchify_proj"), ("time_embed", "adaln_single"), ("norm_q", "q_norm"),
                   ("norm_k", "k_norm"))


def _wan_key(name):
    key = "head.modulation" if name == "scale_shift_table" else name.replace("scale_shift_table", "modulation")
    for new, old in TO_ORIGINAL:
        key = key.replace(new, old)
    return key


def _ltx_key(name):
    for new, old in LTX_TO_ORIGINAL:
        name = name.replace(new, old)
    return name


def write_file(transformer, path, prefix="", dtype=torch.float32, extra=None):
    """A diffusers Wan / LTX-Video transformer's weights as a single file in the family's original
    key layout (``extra``: more tensors as they are, e.g. the VAE keys LTX-Video files ship)."""
    from diffusers import WanTransformer3DModel
    from safetensors.torch import save_file

    rename = _wan_key if isinstance(transformer, WanTransformer3DModel) else _ltx_key
    out = {prefix + rename(name): value.to(dtype).contiguous() for name, value in transformer.state_dict().items()}
    save_file({**out, **(extra or {})}, str(path))
    return out


def _tiny(seed=0, name="wan-tiny"):
    from tomesd_ext.models.video_pipeline import build_video_pipeline

    return build_video_pipeline(name, seed=seed)


def ti2v_tiny(seed=0):
    """A Wan 2.2 TI2V-5B-shaped pipeline at toy widths: the transformer takes and gives 48 latent
    channels, the VAE is the Wan 2.2 one (residual, patch 2: 16x spatial, 48 channels), and
    timesteps are expanded per token (expand_timesteps), as Wan-AI/Wan2.2-TI2V-5B-Diffusers."""
    from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel

    from tomesd_ext.models.weights import build_seeded

    base = _tiny(seed)
    config = {k: v for k, v in base.transformer.config.items() if not k.startswith("_")}
    config.update(in_channels=48, out_channels=48)
    transformer = build_seeded(lambda: WanTransformer3DModel(**config), seed, torch.float32, keep_buffers=True)
    vae = build_seeded(lambda: AutoencoderKLWan(
        base_dim=8, decoder_base_dim=8, z_dim=48, dim_mult=[1, 2, 2, 2], num_res_blocks=1, is_residual=True,
        in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4,
        latents_mean=[0.0] * 48, latents_std=[1.0] * 48), seed + 1, torch.float32, keep_buffers=True)
    return WanPipeline(tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=vae, scheduler=base.scheduler,
                       transformer=transformer, expand_timesteps=True)


def test_the_written_layout_is_the_original_one(tmp_path):
    keys = set(write_file(_tiny().transformer, tmp_path / "wan.safetensors"))
    assert {k.split(".", 2)[2] for k in keys if k.startswith("blocks.0.")} == ORIGINAL_KEYS_OF_A_BLOCK
    assert {k for k in keys if not k.startswith("blocks.")} == {
        "patch_embedding.weight", "patch_embedding.bias", "head.head.weight", "head.head.bias", "head.modulation",
        *(f"{m}.{i}.{p}" for m, i in (("text_embedding", 0), ("text_embedding", 2), ("time_embedding", 0),
                                      ("time_embedding", 2), ("time_projection", 1)) for p in ("weight", "bias"))}


def test_the_written_ltx_layout_is_lightricks_one(tmp_path):
    keys = set(write_file(_tiny(name="ltx-tiny").transformer, tmp_path / "ltx.safetensors"))
    assert {k.split(".", 2)[2] for k in keys if k.startswith("transformer_blocks.0.")} == {
        "scale_shift_table", "ff.net.0.proj.weight", "ff.net.0.proj.bias", "ff.net.2.weight", "ff.net.2.bias",
        *(f"{a}.{p}" for a in ("attn1", "attn2") for p in (
            "q_norm.weight", "k_norm.weight", "to_q.weight", "to_q.bias", "to_k.weight", "to_k.bias",
            "to_v.weight", "to_v.bias", "to_out.0.weight", "to_out.0.bias"))}
    assert {k for k in keys if not k.startswith("transformer_blocks.")} == {
        "scale_shift_table", "patchify_proj.weight", "patchify_proj.bias", "proj_out.weight", "proj_out.bias",
        *(f"{m}.{p}" for m in ("adaln_single.emb.timestep_embedder.linear_1", "adaln_single.emb.timestep_embedder.linear_2",
                               "adaln_single.linear", "caption_projection.linear_1", "caption_projection.linear_2")
          for p in ("weight", "bias"))}


# LTX-Video files as shipped (ltx-video-2b-v0.9.1 and later) hold the VAE too: the transformer
# loader leaves those keys out and the pipeline's VAE is used
LTX_VAE_KEYS = {"vae.decoder.last_scale_shift_table": torch.zeros(2, 8)}


@pytest.mark.parametrize("name,prefix,extra", [
    ("wan-tiny", "", None), ("wan-tiny", "model.diffusion_model.", None),
    ("ltx-tiny", "", LTX_VAE_KEYS), ("ltx-tiny", "model.diffusion_model.", None)])
def test_the_file_weights_replace_the_pipeline_transformer(tmp_path, name, prefix, extra):
    """Bare keys and ComfyUI's checkpoint prefix; fp16 in the file, float32 loaded."""
    other = _tiny(seed=5, name=name).transformer  # not the built-in's weights
    f = tmp_path / "model.safetensors"
    write_file(other, f, prefix, torch.float16, extra)
    assert backend_of(str(f)) == "flow"
    pipe = load_pipeline(str(f), pipeline=name)
    loaded, builtin = pipe.transformer.state_dict(), _tiny(name=name).transformer.state_dict()
    assert type(pipe.transformer) is type(other) and set(loaded) == set(builtin)
    for key, value in other.state_dict().items():
        assert loaded[key].dtype == torch.float32
        assert torch.equal(loaded[key], value.half().float()), key
    first = "patch_embedding.weight" if name == "wan-tiny" else "proj_in.weight"
    assert not torch.equal(loaded[first], builtin[first])


@pytest.mark.parametrize("name", ["ltx-tiny", "ti2v"])
def test_the_file_weights_replace_a_folder_transformer(tmp_path, name):
    """In a saved folder (LTX-Video; Wan 2.2 TI2V-5B-shaped: 48 channels) the file's weights are
    loaded, not the folder's, with the folder's VAE and config."""
    make = ti2v_tiny if name == "ti2v" else (lambda seed=0: _tiny(seed, name))
    folder, other = tmp_path / "folder", make(seed=5).transformer
    make().save_pretrained(folder)
    write_file(other, tmp_path / "model.safetensors")
    pipe = load_pipeline(str(tmp_path / "model.safetensors"), pipeline=str(folder))
    assert pipe.transformer.config.in_channels == other.config.in_channels
    loaded = pipe.transformer.state_dict()
    assert set(loaded) == set(other.state_dict())
    assert all(torch.equal(loaded[k], v) for k, v in other.state_dict().items())
    if name == "ti2v":
        assert pipe.vae.config.z_dim == 48 and pipe.config.expand_timesteps


def test_a_file_of_another_width_is_an_error_naming_both(tmp_path):
    from diffusers import WanTransformer3DModel

    config = dict(_tiny().transformer.config)
    config["ffn_dim"] = 24  # the pipeline's is 48
    wider = WanTransformer3DModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    f = tmp_path / "wan.safetensors"
    write_file(wider, f)
    with pytest.raises(ValueError, match="does not fit pipeline 'wan-tiny'"):
        load_pipeline(str(f), pipeline="wan-tiny")


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """Two jobs each on the built-in wan-tiny / ltx-tiny and on a diffusers folder (wan-tiny,
    ltx-tiny and a Wan 2.2 TI2V-5B-shaped pipeline saved): the pipeline itself, and its
    transformer as a single file in the pipeline (folder: in the folder)."""
    root = tmp_path_factory.mktemp("videofile")
    for name, pipe in (("wan", _tiny()), ("ltx", _tiny(name="ltx-tiny")), ("ti2v", ti2v_tiny())):
        write_file(pipe.transformer, root / f"{name}.safetensors", dtype=torch.float32)
        pipe.save_pretrained(root / f"{name}-folder")
    write_mp4([f[:40, :56] for f in moving_shapes(5, 64)], root / "clip.mp4", 8)
    base = {"input": "clip.mp4", "edit_prompt": "a cat", "steps": 2, "strength": 0.6,
            "tome": {"ratio": 0.5, "min_tokens": 0}}
    jobs = []
    for name in ("wan", "ltx", "ti2v"):
        file, folder = str(root / f"{name}.safetensors"), str(root / f"{name}-folder")
        if name != "ti2v":
            jobs += [{**base, "name": f"{name}-builtin", "model": f"{name}-tiny"},
                     {**base, "name": f"{name}-builtin-file", "model": file, "pipeline": f"{name}-tiny"}]
        jobs += [{**base, "name": f"{name}-folder", "model": folder},
                 {**base, "name": f"{name}-folder-file", "model": file, "pipeline": folder}]
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
    assert len(summary) == 10
    out = {name: _frames(root / "out" / name) for name in summary}
    for name in ("wan", "ltx", "ti2v"):
        if name != "ti2v":
            assert np.array_equal(out[f"{name}-builtin"], out[f"{name}-builtin-file"]), name
        assert np.array_equal(out[f"{name}-folder"], out[f"{name}-folder-file"]), name
    assert not np.array_equal(out["wan-folder"], out["ti2v-folder"])  # the 48-channel transformer and VAE ran
    rc = cli.main(["edit-video", str(f), "--no-progress", "--json", str(root / "s2.json")])
    assert rc == 0 and [r["status"] for r in json.loads((root / "s2.json").read_text())] == ["skipped"] * 10


BASE = {"input": "clip.mp4", "output": "out/x", "edit_prompt": "a cat"}


def test_pipeline_field_errors_name_it(tmp_path):
    f = tmp_path / "wan.safetensors"
    write_file(_tiny().transformer, f)

    def refused(fields, message):
        with pytest.raises(JobError, match=message):
            parse_job(0, {**BASE, **fields}, tmp_path)

    refused({"model": str(f)}, r"^job 1: model .* is a single-file Wan transformer: set `pipeline`")
    refused({"model": "wan-tiny", "pipeline": "wan-tiny"}, r"^job 1: pipeline .wan-tiny. applies only when model is a single-file Wan or LTX-Video")
    refused({"model": str(f), "pipeline": "ltx-tiny"}, r"^job 1: pipeline 'ltx-tiny' is neither a local Wan diffusers folder"
            r".* nor a built-in Wan pipeline \['wan-tiny', 'wan-1.3b-depth4'\] \(model .*: a Wan transformer\)")
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


def test_ltx_pipeline_field_errors_name_it(tmp_path):
    f = tmp_path / "ltx.safetensors"
    write_file(_tiny(name="ltx-tiny").transformer, f, "model.diffusion_model.", extra=LTX_VAE_KEYS)
    wan = tmp_path / "wan-folder"
    _tiny().save_pretrained(wan)

    def refused(fields, message):
        with pytest.raises(JobError, match=message):
            parse_job(0, {**BASE, **fields}, tmp_path)

    refused({"model": str(f)}, r"^job 1: model .* is a single-file LTX-Video transformer: set `pipeline` .*\['ltx-tiny'\]")
    refused({"model": str(f), "pipeline": "wan-tiny"}, r"^job 1: pipeline 'wan-tiny' is neither a local LTX-Video "
            r"diffusers folder \(model_index.json of LTXPipeline / LTXVideoToVideoPipeline / LTXConditionPipeline\)")
    refused({"model": str(f), "pipeline": str(wan)}, r"^job 1: pipeline .*wan-folder' is neither a local LTX-Video")
    refused({"model": "ltx-tiny", "pipeline": "ltx-tiny"}, r"^job 1: pipeline 'ltx-tiny' applies only when model is")
    assert parse_job(0, {**BASE, "model": str(f), "pipeline": "ltx-tiny"}, tmp_path).spec["pipeline"] == "ltx-tiny"


def test_an_ltx_file_of_another_width_is_an_error_naming_both(tmp_path):
    from diffusers import LTXVideoTransformer3DModel

    config = {k: v for k, v in _tiny(name="ltx-tiny").transformer.config.items() if not k.startswith("_")}
    config["caption_channels"] *= 2
    f = tmp_path / "ltx.safetensors"
    write_file(LTXVideoTransformer3DModel(**config), f)
    with pytest.raises(ValueError, match="does not fit pipeline 'ltx-tiny'"):
        load_pipeline(str(f), pipeline="ltx-tiny")

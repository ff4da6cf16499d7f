"""Golden outputs of every merging policy in both adapters, for behaviour-preserving refactors.

    python scripts/golden_outputs.py save out/golden.pt     # before moving code
    python scripts/golden_outputs.py check out/golden.pt    # after: every output bit for bit

Tiny models, fixed seeds, one thread: ToMe (default, +MLP +cross-attention, level/step plan
reuse, no randomness), importance (CFG map over three steps, prune phase), ToDo, queries-only,
VidToMe (the video editor's chunked UNet calls) on SD1.x and SDXL UNets through the diffusers
adapter; and, with COMFYUI_PATH set, the ToMe, importance and VidToMe nodes inside ComfyUI.
Bit-identity holds on one machine and torch build; across machines compare with a tolerance.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tests", "comfy")]
torch.set_num_threads(1)


def _unet_call(unet, sample, t, text, extra=None):
    with torch.no_grad():
        return unet(sample, torch.tensor(t), encoder_hidden_states=text, **(extra or {})).sample


def _inputs(unet, seed=0, cfg_pair=False):
    """(sample, text, extra) of the test suite's UNet inputs at 32x32 (tests/diffusers/conftest.py);
    cfg_pair: the first latent twice, as a CFG batch."""
    spec = importlib.util.spec_from_file_location("diffusers_conftest", os.path.join(REPO, "tests", "diffusers", "conftest.py"))
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    sample, _t, text, extra = conftest.unet_inputs(unet, hw=(32, 32), seed=seed)
    return (torch.cat([sample[:1], sample[:1]]) if cfg_pair else sample), text, extra


def diffusers_outputs() -> dict:
    from tomesd_ext import apply_todo, apply_tome, remove_todo, remove_tome
    from tomesd_ext.diffusers import apply_query_merge
    from tomesd_ext.models import build_unet

    out = {}
    steps = (900, 500, 100)
    for name in ("tiny", "tiny-sdxl"):
        unet = build_unet(name, seed=0).eval()
        sample, text, extra = _inputs(unet)
        pair, ptext, pextra = _inputs(unet, cfg_pair=True, seed=1)
        tome_cases = {
            "tome": dict(ratio=0.5, seed=1, min_tokens=0),
            "tome_mlp_cross": dict(ratio=0.6, seed=2, min_tokens=0, merge_mlp=True, merge_crossattn=True, max_downsample=2),
            "tome_norand_sx3": dict(ratio=0.4, use_rand=False, sx=3, sy=1, min_tokens=0),
            "tome_reuse": dict(ratio=0.5, seed=3, min_tokens=0, reuse="level", reuse_steps=2),
            "importance": dict(ratio=0.5, seed=4, min_tokens=0, mode="importance", prune_steps=1),
        }
        for case, kw in tome_cases.items():
            apply_tome(unet, **kw)
            for t in steps:
                out[f"diffusers/{name}/{case}/t{t}"] = _unet_call(unet, pair, t, ptext, pextra)
            remove_tome(unet)
        apply_todo(unet, factor=2)
        out[f"diffusers/{name}/todo"] = _unet_call(unet, sample, 500, text, extra)
        remove_todo(unet)
        apply_query_merge(unet, ratio=0.5, seed=5, max_downsample=2)
        out[f"diffusers/{name}/queries"] = _unet_call(unet, sample, 500, text, extra)
        remove_tome(unet)
        out[f"diffusers/{name}/unpatched"] = _unet_call(unet, sample, 500, text, extra)
    return out


def video_outputs() -> dict:
    from tomesd_ext.video import EditSettings, VideoEditor, moving_shapes
    from tomesd_ext.video.models import load_pipeline

    pipe = load_pipeline("tiny")
    editor = VideoEditor(pipe)
    frames = moving_shapes(6, 32)
    out = {}
    cases = {
        "vidtome": dict(mode="sdedit", steps=3, strength=1.0, seed=3, chunk_size=3),
        "vidtome_noalign": dict(mode="sdedit", steps=3, strength=1.0, seed=4, chunk_size=2,
                                vidtome={"align_batch": False, "global_rand": 1.0, "max_downsample": 1}),
        "per_frame": dict(mode="sdedit", steps=2, strength=1.0, seed=3, vidtome=None),
    }
    for case, kw in cases.items():
        res = editor.edit(frames, "", "a cat", EditSettings(**kw))
        out[f"video/{case}"] = torch.from_numpy(__import__("numpy").stack(res))
    return out


def comfy_outputs() -> dict:
    from comfy_env import comfy_model_from_diffusers, comfyui_path, import_comfy, importance_node, node_defaults, run_unet, tome_node

    if comfyui_path() is None:
        print("COMFYUI_PATH is not set: ComfyUI outputs skipped")
        return {}
    import_comfy()
    import comfy.samplers
    from diffusers import UNet2DConditionModel

    from nodes.vidtome import TomesdExtVidToMe
    from tomesd_ext.models import build_seeded, get_config

    config = {**get_config("tiny")["unet"], "norm_num_groups": 32}
    unet = build_seeded(lambda: UNet2DConditionModel(**config), seed=0)
    base = comfy_model_from_diffusers(unet, "sd", {"num_heads": 2, "num_head_channels": -1})
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 32, generator=g)
    out = {}
    for case, kw in {
        "tome": dict(ratio=0.5, seed=1),
        "tome_mlp_cross": dict(ratio=0.6, seed=2, merge_mlp=True, merge_crossattn=True, max_downsample="2"),
        "tome_norand": dict(ratio=0.4, use_rand=False, sx=3, sy=1),
    }.items():
        model = tome_node(base, **kw)
        for t in (900, 500):
            out[f"comfy/{case}/t{t}"] = run_unet(model, x, t, ctx)

    pos = [[torch.randn(1, 77, 32, generator=g), {}]]
    neg = [[torch.randn(1, 77, 32, generator=g), {}]]
    noise = torch.randn(2, 4, 16, 16, generator=g)

    def sample(model, cfg):
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(pos, neg)
        guider.set_cfg(cfg)
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 3)
        return guider.sample(noise.clone(), torch.zeros_like(noise), comfy.samplers.sampler_object("euler"), sigmas,
                             disable_pbar=True, seed=0)

    out["comfy/importance/sample"] = sample(importance_node(base, ratio=0.5, seed=5, prune_steps=1), 5.0)
    out["comfy/importance_cfg1/sample"] = sample(importance_node(base, ratio=0.5, seed=5), 1.0)
    out["comfy/tome/sample"] = sample(tome_node(base, ratio=0.5, seed=6, start_percent=0.2), 5.0)

    frames = 6
    lat = torch.randn(frames, 4, 16, 16, generator=g)
    vx = torch.cat([lat, lat])
    vctx = torch.randn(2, 77, 32, generator=g).repeat_interleave(frames, 0)
    for case, kw in {
        "vidtome": dict(chunk_size=2, seed=3),
        "vidtome_noalign": dict(chunk_size=4, align_batch=False, global_rand=1.0, seed=5, max_downsample="1"),
    }.items():
        model = TomesdExtVidToMe().patch(base, **node_defaults(TomesdExtVidToMe, **kw))[0]
        out[f"comfy/{case}"] = run_unet(model, vx, 500, vctx, cond_or_uncond=[1, 0])
    out["comfy/unpatched"] = run_unet(base, x, 500, ctx)
    return out


def main(argv):
    if len(argv) != 3 or argv[1] not in ("save", "check"):
        print(__doc__)
        return 2
    import tomesd_ext.core.options as options

    options.MIN_TOKENS_DEFAULT = 0
    outs = {**diffusers_outputs(), **video_outputs(), **comfy_outputs()}
    if argv[1] == "save":
        os.makedirs(os.path.dirname(os.path.abspath(argv[2])), exist_ok=True)
        torch.save(outs, argv[2])
        print(f"saved {len(outs)} outputs to {argv[2]}")
        return 0
    golden = torch.load(argv[2])
    bad = 0
    for key in sorted(set(golden) | set(outs)):
        a, b = golden.get(key), outs.get(key)
        if a is None or b is None:
            print(f"MISSING  {key} ({'golden' if a is None else 'now'})")
            bad += 1
        elif not torch.equal(a, b):
            diff = (a.float() - b.float()).abs().max().item()
            print(f"DIFFERS  {key}: max |diff| {diff:.3g}")
            bad += 1
        else:
            print(f"same     {key}")
    print(f"{len(golden) - bad} of {len(golden)} outputs bit-identical")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

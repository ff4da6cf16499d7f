"""Loads the node pack into the ComfyUI at COMFYUI_PATH the way ComfyUI loads a custom node, and
runs each registered node in ComfyUI's own sampler on a tiny random SD1.x UNet, with diffusers and
transformers out of the pack's reach. Run as a script in a fresh process (a ComfyUI is imported
once per process); prints one JSON line that the calling test checks:

    python tests/comfy/pack_probe.py            (COMFYUI_PATH set)

What "out of reach" means: ``diffusers`` cannot be imported by anyone (ComfyUI does not use it);
``transformers`` cannot be imported while the pack is loaded and registered (before ComfyUI's
model code is imported, which needs it), and our own files may not import either of them at any
time (an import statement in a file of this repository naming them fails and is recorded).
Nothing here needs diffusers: the tiny UNet is built from a ComfyUI unet_config with seeded
random weights.
"""

import asyncio
import builtins
import importlib.abc
import importlib.util
import json
import math
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LIBRARIES = ("diffusers", "transformers")  # the [diffusers] extra: no node may need them

# SD1.x topology at toy width (what ComfyUI's detection gives for the tiny test UNet)
TINY_UNET = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "model_channels": 32,
    "num_res_blocks": [2, 2, 2], "transformer_depth": [1, 1, 1, 1, 0, 0],
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 0, 0, 0], "channel_mult": [1, 2, 2],
    "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 32,
    "use_temporal_resblock": False, "use_temporal_attention": False, "num_heads": 2, "num_head_channels": -1,
}

attempts = []  # imports of LIBRARIES that were refused: (importer, module)


class Blocker(importlib.abc.MetaPathFinder):
    """Refuses to find the modules in ``blocked`` (and their submodules) for everyone."""

    def __init__(self, blocked):
        self.blocked = set(blocked)

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.blocked:
            attempts.append(("<any>", name))
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by pack_probe)", name=name)
        return None


def guard_our_imports():
    """An import statement in one of our files that names a LIBRARY fails, even when ComfyUI has
    the module loaded already."""
    real_import = builtins.__import__
    # our files: the pack's entry point, the nodes and the library (not a virtual environment that
    # may live inside the checkout, as .venv does on a fresh machine)
    ours = (os.path.join(REPO, "__init__.py"), os.path.join(REPO, "nodes") + os.sep, os.path.join(REPO, "tomesd_ext") + os.sep)

    def guarded(name, globals=None, locals=None, fromlist=(), level=0):
        importer = (globals or {}).get("__file__") or ""
        if level == 0 and name.split(".")[0] in LIBRARIES and os.path.abspath(importer).startswith(ours):
            attempts.append((os.path.relpath(importer, REPO), name))
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by pack_probe)", name=name)
        return real_import(name, globals, locals, fromlist, level)

    builtins.__import__ = guarded


def load_pack():
    """The pack as ComfyUI's load_custom_node imports a folder, then its V3 registration."""
    name = REPO.replace(".", "_x_")
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "__init__.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    from comfy_api.latest import ComfyExtension

    extension = asyncio.run(module.comfy_entrypoint())
    assert isinstance(extension, ComfyExtension), type(extension)
    return {cls.GET_SCHEMA().node_id: cls for cls in asyncio.run(extension.get_node_list())}


def tiny_model():
    import torch

    import comfy.model_patcher
    import comfy.supported_models

    config = comfy.supported_models.SD15(dict(TINY_UNET))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, "model.diffusion_model.")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # ComfyUI's layers skip initialisation: seeded weights, unit norms, zero biases
        for pname, p in model.diffusion_model.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p[0].numel()))
            else:
                p.fill_(1.0 if pname.endswith("weight") else 0.0)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def sample(model, batch, cfg=5.0, steps=3, size=16):
    """ComfyUI's CFG sampler (euler, normal schedule), size x size latents."""
    import torch

    import comfy.samplers

    gen = torch.Generator().manual_seed(0)
    pos = [[torch.randn(1, 77, 32, generator=gen), {}]]
    neg = [[torch.randn(1, 77, 32, generator=gen), {}]]
    noise = torch.randn(batch, 4, size, size, generator=gen)
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(pos, neg)
    guider.set_cfg(cfg)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", steps)
    return guider.sample(noise.clone(), torch.zeros_like(noise), comfy.samplers.sampler_object("euler"), sigmas,
                         disable_pbar=True, seed=0)


def run_node(cls, model, **over):
    """``cls.execute`` as ComfyUI calls it: every widget at its default, min_tokens 0 (the
    tiny grids are below the auto-skip), then ``over``; returns the output MODEL."""
    required = cls.DEFINITION.INPUT_TYPES()["required"]
    widgets = {k: spec[1]["default"] for k, spec in required.items() if k != "model"}
    widgets.update({"min_tokens": 0} if "min_tokens" in widgets else {}, **over)
    return cls.execute(model, **widgets).args[0]


def main():
    import torch

    comfy_path = os.environ["COMFYUI_PATH"]
    sys.path.insert(0, comfy_path)
    for mod in list(sys.modules):
        assert mod.split(".")[0] not in LIBRARIES, f"{mod} imported before the probe started"
    guard_our_imports()
    blocker = Blocker(LIBRARIES)
    sys.meta_path.insert(0, blocker)

    from comfy.cli_args import args

    args.cpu = True
    args.use_pytorch_cross_attention = True  # as import_comfy (comfy_env.py): not the slow CPU default
    nodes = load_pack()  # diffusers and transformers blocked for everyone here
    report = {"nodes": sorted(nodes), "loaded_without": sorted(LIBRARIES)}
    blocker.blocked.discard("transformers")  # ComfyUI's model code imports it; our files still may not

    import comfy.model_management  # noqa: F401  (device chosen now, from args.cpu)
    import comfyui_version

    report["comfyui"] = comfyui_version.__version__
    torch.set_num_threads(1)
    base = tiny_model()
    runs = {}
    for node_id, cls in sorted(nodes.items()):
        batch = 4 if node_id == "TomesdExtVidToMe" else 2  # VidToMe: the batch is the frames of a clip
        # a node that does not show min_tokens (the simple ToMe node) runs with the auto-skip: a
        # latent whose first level has at least that many tokens (2048: 48x48) merges there
        hidden = cls.DEFINITION.hidden_defaults() if hasattr(cls.DEFINITION, "hidden_defaults") else {}
        size = max(16, 8 * math.ceil(math.sqrt(hidden.get("min_tokens", 0)) / 8))
        ref = sample(base, batch, size=size)
        out = sample(run_node(cls, base), batch, size=size)
        runs[node_id] = {
            "finite": bool(torch.isfinite(out).all()),
            "changed": not torch.allclose(out, ref, atol=1e-4),
            "input_untouched": bool(torch.equal(sample(base, batch, size=size), ref)),
        }
        if node_id.startswith("TomesdExtTokenMerging"):
            runs[node_id]["ratio0_exact"] = bool(torch.equal(sample(run_node(cls, base, ratio=0.0), batch, size=size), ref))
    report["runs"] = runs
    report["refused_imports"] = attempts
    # our library must come from this folder (not from another install of tomesd-ext on the path)
    report["foreign_modules"] = sorted(
        name for name, mod in sys.modules.items() if "tomesd_ext" in name.split(".")
        and not os.path.abspath(getattr(mod, "__file__", None) or REPO).startswith(REPO + os.sep))
    print(json.dumps(report))


if __name__ == "__main__":
    main()

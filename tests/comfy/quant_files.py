"""The diffusion models of Flux.1, SD3.5, Wan 2.1 and Qwen-Image as ComfyUI users load them:
a safetensors file through ComfyUI's own loader (as "Load Diffusion Model" / UNETLoader, also with
its fp8 ``weight_dtype``), and the same weights as GGUF files (Q8_0, Q4_K) through ComfyUI-GGUF's
"Unet Loader (GGUF)", the node pack imported in this process as ComfyUI imports a custom node.

Key names and shapes come from ComfyUI's own classes on the meta device (ComfyUI keeps the
original checkpoint names, which GGUF conversions of these models keep too); values are the seeded
random ones of dit_files; GGUF tensors are quantized as conversions store them (gguf_files of
tests/dit: Q8_0 or Q4_K for large matrices, F16 for small ones, F32 for vectors and >2-D tensors).
Depth is cut where ComfyUI reads it from the file, width where it reads that too:

- ``flux``: Flux.1-dev, 1 double + 1 single block at the real width 3072 (ComfyUI's detection fixes
  24 heads x 128), bf16 (dit_files.flux_model_file: the Flux workflow's file);
- ``sd35``: SD3.5 Large's MMDiT (per-head RMS query/key norms) at depth 4 = width 256, fp16;
- ``wan``: Wan 2.1 text-to-video, width 256 (2 heads of 128), feed-forward 512, 2 blocks, fp16;
- ``qwen``: Qwen-Image, 1 block at the real width 3072 (ComfyUI's detection reads only the depth
  and input channels), bf16.

Files are written once into $TOMESD_EXT_CACHE/dit_files (about 2.5 GB; the first run takes a
few minutes, most of it quantizing the two 3072-wide models).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from typing import Callable

import torch

import dit_files
from comfy_env import import_comfy, require_node_pack

LOADERS = ("safetensors", "gguf-Q8_0", "gguf-Q4_K", "fp8_e4m3fn", "fp8_e5m2")
GGUF_PACK = "ComfyUI-GGUF"


@dataclass(frozen=True)
class Spec:
    """meta: () -> {name: meta tensor} of ComfyUI's class; file: () -> its safetensors file; arch:
    general.architecture of its GGUF files (ComfyUI-GGUF checks it); context: text width."""

    meta: Callable
    file: Callable
    arch: str
    context: int


def _wan_meta():
    import_comfy()
    from wan_files import wan_model

    return dict(wan_model(dim=256, ffn_dim=512, num_layers=2).state_dict())


def _qwen_meta():
    import_comfy()
    import comfy.ops
    from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel

    return dit_files._meta_state(lambda: QwenImageTransformer2DModel(
        num_layers=1, image_model="qwen_image", operations=comfy.ops.disable_weight_init))


def _sd35_meta():
    return dit_files.mmdit_meta(4, "rms")


def _file(name, meta, seed, dtype):
    return lambda: dit_files._write(name, lambda: dit_files._random_like(meta(), seed=seed, dtype=dtype))


SPECS = {
    "flux": Spec(dit_files.flux_meta, dit_files.flux_model_file, "flux", 4096),
    "sd35": Spec(_sd35_meta, _file("sd35_mmdit4_rms", _sd35_meta, 10, torch.float16), "sd3", 4096),
    "wan": Spec(_wan_meta, _file("wan21_256w_2blocks", _wan_meta, 11, torch.float16), "wan", 4096),
    "qwen": Spec(_qwen_meta, _file("qwen_image_1block", _qwen_meta, 12, torch.bfloat16), "qwen_image", 3584),
}
FAMILIES = tuple(SPECS)


def safetensors_file(family: str) -> str:
    return SPECS[family].file()


def gguf_file(family: str, quant: str) -> str:
    """The GGUF file of ``family`` with quant type ``quant`` ("Q8_0" or "Q4_K") for its large
    matrices, from the weights of its safetensors file."""
    from safetensors.torch import load_file

    if quant not in ("Q8_0", "Q4_K"):
        raise ValueError(f"quant={quant!r}: expected 'Q8_0' or 'Q4_K'")
    source = safetensors_file(family)
    path = os.path.join(os.path.dirname(source), f"{os.path.basename(source)[:-len('.safetensors')]}-{quant}.gguf")
    if not os.path.exists(path):
        tmp = path + f".{os.getpid()}.tmp"
        writer = _gguf_files()
        writer.write_gguf(tmp, writer.quantized(load_file(source), quant), SPECS[family].arch)
        os.replace(tmp, path)
    return path


def _gguf_files():
    """tests/dit/gguf_files.py (the GGUF writer of the diffusers tests), by its path: ComfyUI's own
    ``tests`` package shadows ours once COMFYUI_PATH is on sys.path."""
    name = "tomesd_ext_tests_gguf_files"
    if name not in sys.modules:
        path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "dit", "gguf_files.py")
        spec = importlib.util.spec_from_file_location(name, path)
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def gguf_pack():
    """ComfyUI-GGUF imported as ComfyUI imports a custom node (its folder as the package
    ``ComfyUI-GGUF``); skips (in CI: fails) without the pack (comfy_env.require_node_pack)."""
    path = require_node_pack(GGUF_PACK)
    import_comfy()
    if GGUF_PACK not in sys.modules:
        spec = importlib.util.spec_from_file_location(GGUF_PACK, os.path.join(path, "__init__.py"),
                                                      submodule_search_locations=[path])
        module = importlib.util.module_from_spec(spec)
        sys.modules[GGUF_PACK] = module
        spec.loader.exec_module(module)
    return sys.modules[GGUF_PACK]


def load(family: str, loader: str):
    """The ComfyUI MODEL of ``family`` as ``loader`` (LOADERS) gives it."""
    import_comfy()
    import comfy.sd

    if loader.startswith("gguf-"):
        path = gguf_file(family, loader[len("gguf-"):])
        pack = gguf_pack()
        import folder_paths

        folder = os.path.dirname(path)
        if folder not in folder_paths.get_folder_paths("diffusion_models"):
            folder_paths.add_model_folder_path("diffusion_models", folder)
        return pack.NODE_CLASS_MAPPINGS["UnetLoaderGGUF"]().load_unet(os.path.basename(path))[0]
    options = {}
    if loader.startswith("fp8_"):
        options["dtype"] = getattr(torch, f"float8_{loader[len('fp8_'):]}")  # as UNETLoader's weight_dtype
    elif loader != "safetensors":
        raise ValueError(f"loader={loader!r}: expected one of {LOADERS}")
    return comfy.sd.load_diffusion_model(safetensors_file(family), model_options=options)


def weight_kinds(model) -> set:
    """What the diffusion model's Linear weights are: GGUF quant type names, or torch dtypes."""
    kinds = set()
    for module in model.model.diffusion_model.modules():
        if isinstance(module, torch.nn.Linear):
            w = module.weight
            kind = getattr(w, "tensor_type", None)
            kinds.add(getattr(kind, "name", None) if kind is not None else str(w.dtype))
    return kinds


def inputs(family: str, batch: int = 2, hw=(16, 16), n_txt: int = 7, seed: int = 1):
    """(latent, text context, extra conds) of one denoiser call: a (B, 16, H, W) latent (Wan: 2
    latent frames, Qwen-Image: 1), random text of the family's width, pooled vector and guidance
    where the family takes them."""
    g = torch.Generator().manual_seed(seed)
    frames = {"wan": (2,), "qwen": (1,)}.get(family, ())
    x = torch.randn(batch, 16, *frames, *hw, generator=g)
    ctx = torch.randn(batch, n_txt, SPECS[family].context, generator=g)
    conds = {}
    if family == "flux":
        conds = {"y": torch.randn(batch, 768, generator=g), "guidance": torch.full((batch,), 3.5)}
    elif family == "sd35":
        conds = {"y": torch.randn(batch, 2048, generator=g)}
    return x, ctx, conds


def image_tokens(family: str, x) -> int:
    """Tokens of the latent's grid (patch 2x2, Wan per latent frame)."""
    n = (x.shape[-2] // 2) * (x.shape[-1] // 2)
    return n * x.shape[2] if x.ndim == 5 else n


@contextlib.contextmanager
def attention_lengths(model):
    """(clone of ``model`` whose attention calls are recorded, [(query length, key length)]): an
    ``optimized_attention_override`` put on before our node sees what attention sees (our kv mode
    calls it after merging keys and values)."""
    seen = []

    def record(func, q, k, v, heads, *args, **kwargs):
        if kwargs.get("skip_reshape", False):
            seen.append((q.shape[-2], k.shape[-2]))
        else:
            seen.append((q.shape[1], k.shape[1]))
        return func(q, k, v, heads, *args, **kwargs)

    m = model.clone()
    m.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = record
    yield m, seen


def lora_state(model, rank: int = 4, scale: float = 0.5, seed: int = 7) -> dict:
    """A LoRA in the generic format ComfyUI's loader reads (``diffusion_model.<layer>.lora_up /
    lora_down / alpha``) on every Linear inside the transformer blocks."""
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for name, module in model.model.diffusion_model.named_modules():
        if not isinstance(module, torch.nn.Linear) or "blocks." not in name:
            continue
        key = f"diffusion_model.{name}"
        out_f, in_f = module.out_features, module.in_features
        lora[f"{key}.lora_down.weight"] = torch.randn(rank, in_f, generator=g) * scale / in_f**0.5
        lora[f"{key}.lora_up.weight"] = torch.randn(out_f, rank, generator=g) * scale / rank**0.5
        lora[f"{key}.alpha"] = torch.tensor(float(rank))
    return lora

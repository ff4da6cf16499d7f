"""Token Merging (Importance) node: MODEL -> MODEL, ToMe whose destinations come from the
classifier-free-guidance difference of the previous step (Wu et al., arXiv 2411.16720).

The same core as the diffusers adapter's ``apply_tome(..., mode="importance")``
(``core.ImportancePlanner``); the map comes from ComfyUI's post-CFG hook
(tomesd_ext/comfy/importance.py). Classic node API, like nodes/tome.py, whose inputs it shares.
"""

from __future__ import annotations

from ._imports import comfy_adapter, core
from .tome import TomesdExtTokenMerging

ToMeOptions = core.ToMeOptions
POOL_FACTOR_MIN, POOL_FACTOR_MAX = core.options.POOL_FACTOR_RANGE


class TomesdExtImportanceMerging(TomesdExtTokenMerging):
    """Importance-based Token Merging: destinations drawn from the most CFG-sensitive tokens."""

    DESCRIPTION = (
        "Importance-based Token Merging for UNet models (SD 1.x, SD 2.x, SDXL): ToMe whose kept "
        "(destination) tokens are drawn from the tokens where the conditional and unconditional "
        "predictions of the previous step differ most, so the prompt-relevant parts keep their "
        "detail. Needs cfg > 1 (the map comes from classifier-free guidance); at cfg = 1 it merges "
        "exactly like the ToMe node and says so once in the console. Put it between the model "
        "loader (and LoRA) and the sampler. A second merge node (ToMe or importance) on the same "
        "model replaces this one; another model type passes through unchanged with a warning."
    )

    @classmethod
    def INPUT_TYPES(cls):
        tome = TomesdExtTokenMerging.INPUT_TYPES()["required"]
        required = {}
        for name, spec in tome.items():
            if name == "use_rand":
                continue  # the draw from the importance pool is always seeded-random
            required[name] = spec
            if name == "seed":
                required["pool_factor"] = ("FLOAT", {
                    "default": 1.4, "min": POOL_FACTOR_MIN, "max": POOL_FACTOR_MAX, "step": 0.05,
                    "tooltip": "Size of the importance pool the destinations are drawn from: "
                               "(1 - ratio) * pool_factor of the tokens, the most important first. "
                               "1.4 = the paper's SD value; 1.0 never merges away the top tokens.",
                })
                required["prune_steps"] = ("INT", {
                    "default": 0, "min": 0, "max": 1000,
                    "tooltip": "The first N sampling steps drop merged tokens instead of averaging "
                               "them (the paper's prune phase; its SD demo uses 2). 0 = off.",
                })
        required["ratio"] = ("FLOAT", {
            **tome["ratio"][1],
            "tooltip": "Fraction of a merged level's tokens merged away. 0 = off. At most "
                       "min(1 - 1/(sx*sy), 1 - 1/(sx*sy*pool_factor)) (0.75 for 2x2 windows and "
                       "pool_factor >= 1); larger values are clamped.",
        })
        required["seed"] = ("INT", {
            **tome["seed"][1],
            "tooltip": "Seed of the destination draw from the importance pool (and of ToMe's "
                       "windows on the first step); not the noise seed.",
        })
        return {"required": required}

    @staticmethod
    def options(ratio, max_downsample, sx, sy, seed, pool_factor, prune_steps, merge_attn, merge_crossattn,
                merge_mlp, min_tokens=2048) -> "ToMeOptions":
        """Validated importance-mode ToMeOptions from the widget values (raises OptionError)."""
        md = max_downsample if max_downsample == "auto" else int(max_downsample)
        return ToMeOptions.create(
            ratio=float(ratio), max_downsample=md, sx=int(sx), sy=int(sy), seed=int(seed),
            merge_attn=bool(merge_attn), merge_crossattn=bool(merge_crossattn), merge_mlp=bool(merge_mlp),
            min_tokens=int(min_tokens), mode="importance", pool_factor=float(pool_factor),
            prune_steps=int(prune_steps),
        )

    @staticmethod
    def apply(model, opts, start_percent, end_percent):
        return comfy_adapter.apply_importance_patch(model, opts, start_percent, end_percent)


NODE_CLASS_MAPPINGS = {"TomesdExtImportanceMerging": TomesdExtImportanceMerging}
NODE_DISPLAY_NAME_MAPPINGS = {"TomesdExtImportanceMerging": "Token Merging (Importance, tomesd-ext)"}

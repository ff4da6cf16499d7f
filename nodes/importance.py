"""Token Merging (Importance) node: MODEL -> MODEL, ToMe whose destinations come from the
classifier-free-guidance difference of the previous step (Wu et al., arXiv 2411.16720).

The same core as the diffusers adapter's ``apply_tome(..., mode="importance")``
(``core.ImportancePolicy``), on UNets and on the ToMe node's transformers; the map comes from
ComfyUI's post-CFG hook (tomesd_ext/comfy/importance.py). A definition like nodes/tome.py, whose inputs it shares.
"""

from __future__ import annotations

from .base import MODEL_INPUT, WINDOW_INPUTS, combo_value
from .library import comfy_adapter, core
from .tome import TomesdExtTokenMerging, tome_widgets, window_inputs_error

ToMeOptions = core.ToMeOptions
# use_rand is left out: the draw from the importance pool is always seeded-random
WIDGETS = ("ratio", "max_downsample", "sx", "sy", "seed", "pool_factor", "prune_steps", "merge_attn",
           "merge_crossattn", "merge_mlp", "min_tokens")


class TomesdExtImportanceMerging(TomesdExtTokenMerging):
    """Importance-based Token Merging: destinations drawn from the most CFG-sensitive tokens."""

    DESCRIPTION = (
        "Importance-based Token Merging for UNet models (SD 1.x, SD 2.x, SDXL) and the transformers "
        "of the ToMe node (Flux, SD3, Qwen-Image, PixArt, Lumina2 / Z-Image, Wan, HunyuanVideo, "
        "LTX-Video; at the family's default dit_mode, max_downsample and merge_* ignored): ToMe whose "
        "kept (destination) tokens are drawn from the tokens where the conditional and unconditional "
        "predictions of the previous step differ most, so the prompt-relevant parts keep their "
        "detail. Needs cfg > 1 (the map comes from classifier-free guidance); at cfg = 1 (as "
        "guidance-distilled Flux runs) it merges exactly like the ToMe node and says so once in the "
        "console. Put it between the model loader (and LoRA) and the sampler. A second merge node "
        "(ToMe or importance) on the same model replaces this one; another model type passes "
        "through unchanged with a warning."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": MODEL_INPUT, **tome_widgets(WIDGETS), **WINDOW_INPUTS}}

    @classmethod
    def VALIDATE_INPUTS(cls, start_percent=0.0, end_percent=1.0, sx=2, sy=2):
        # named inputs only (see TomesdExtTokenMerging.VALIDATE_INPUTS); no video inputs here
        return window_inputs_error(cls, start_percent, end_percent, sx, sy) or True

    @staticmethod
    def options(ratio, max_downsample, sx, sy, seed, pool_factor, prune_steps, merge_attn, merge_crossattn,
                merge_mlp, min_tokens=None) -> "ToMeOptions":
        """Validated importance-mode ToMeOptions from the widget values (raises OptionError)."""
        return ToMeOptions.create(
            ratio=ratio, max_downsample=combo_value(max_downsample), sx=sx, sy=sy, seed=seed,
            merge_attn=merge_attn, merge_crossattn=merge_crossattn, merge_mlp=merge_mlp, min_tokens=min_tokens,
            mode="importance", pool_factor=pool_factor, prune_steps=prune_steps,
        )

    @staticmethod
    def apply(model, opts, start_percent, end_percent):
        return comfy_adapter.apply_importance_patch(model, opts, start_percent, end_percent)


NODE_DEFINITIONS = {"TomesdExtImportanceMerging": TomesdExtImportanceMerging}
DISPLAY_NAMES = {"TomesdExtImportanceMerging": "Token Merging (Importance, tomesd-ext)"}

"""Random-weight video-to-video pipelines of the video transformers (diffusers WanPipeline /
LTXPipeline holding every part), for `tomesd-ext edit-video`; nothing is downloaded.

``VIDEO_PIPELINES`` names a transformer of ``video_configs`` (with an optional reduced depth),
a small video VAE of the family's geometry (Wan: 8x spatial / 4x temporal, 16 channels; LTX:
32x / 8x, 128 channels; random weights at toy widths, so decoding costs little next to the
transformer), a one-layer T5 encoder of the transformer's text width and the tiny CLIP BPE
tokenizer (any text tokenizes), and the family's flow scheduler (Wan: shift 3.0 as the 480p
pipeline; LTX: its resolution-dependent shift).
- ``wan-tiny`` / ``ltx-tiny``: the ``tiny-wan`` / ``tiny-ltx`` transformers (seconds per job).
- ``wan-1.3b-depth4``: the Wan2.1-T2V-1.3B transformer at its real width with 4 of its 30
  blocks (measurement: merging cost and savings per block are those of the real model).
"""

from __future__ import annotations

import torch

from .dit_build import transformer_class
from .dit_configs import get_dit_config
from .tokenizer import build_tokenizer
from .weights import build_seeded

WAN_TINY_VAE = {"base_dim": 8, "z_dim": 16, "dim_mult": [1, 2, 2, 2], "num_res_blocks": 1,
                "temperal_downsample": [False, True, True]}
LTX_TINY_VAE = {"block_out_channels": (8, 8, 8, 8), "decoder_block_out_channels": (8, 8, 8, 8),
                "layers_per_block": (1, 1, 1, 1, 1), "decoder_layers_per_block": (1, 1, 1, 1, 1)}
WAN_SCHEDULER = {"shift": 3.0}
LTX_SCHEDULER = {  # Lightricks/LTX-Video scheduler/scheduler_config.json
    "use_dynamic_shifting": True, "base_shift": 0.95, "max_shift": 2.05,
    "base_image_seq_len": 1024, "max_image_seq_len": 4096, "shift": 1.0,
}

VIDEO_PIPELINES = {
    "wan-tiny": {"transformer": "tiny-wan", "layers": None},
    "ltx-tiny": {"transformer": "tiny-ltx", "layers": None},
    "wan-1.3b-depth4": {"transformer": "wan-1.3b", "layers": 4},
}
VIDEO_PIPELINE_NAMES = tuple(VIDEO_PIPELINES)


def _text_encoder(family, width, vocab, seed, dtype):
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    args = dict(vocab_size=vocab, d_model=width, d_kv=16, d_ff=64, num_layers=1, num_heads=2,
                relative_attention_num_buckets=8, dropout_rate=0.0)
    if family == "wan":  # Wan pipelines hold a umT5 encoder, LTX a T5 encoder
        return build_seeded(lambda: UMT5EncoderModel(UMT5Config(**args)), seed, dtype)
    return build_seeded(lambda: T5EncoderModel(T5Config(**args)), seed, dtype)


def build_video_pipeline(name, seed=0, dtype=torch.float32):
    """Random-weight WanPipeline / LTXPipeline of ``name`` (one of ``VIDEO_PIPELINE_NAMES``),
    progress bar off; its ``text_tokens`` attribute is the prompt length to encode."""
    from diffusers import AutoencoderKLLTXVideo, AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, LTXPipeline, WanPipeline

    if name not in VIDEO_PIPELINES:
        raise KeyError(f"unknown built-in video model {name!r}; choose one of {', '.join(VIDEO_PIPELINES)}")
    spec = VIDEO_PIPELINES[name]
    entry = get_dit_config(spec["transformer"])
    family, config = entry["family"], dict(entry["transformer"])
    if spec["layers"]:
        config["num_layers"] = spec["layers"]
    cls = transformer_class(family)
    transformer = build_seeded(lambda: cls(**config), seed, dtype, keep_buffers=True)
    tokenizer = build_tokenizer()
    if family == "wan":
        vae = build_seeded(lambda: AutoencoderKLWan(**WAN_TINY_VAE), seed + 1, dtype, keep_buffers=True)
        text = _text_encoder(family, config["text_dim"], len(tokenizer), seed + 2, dtype)
        pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text, vae=vae, transformer=transformer,
                           scheduler=FlowMatchEulerDiscreteScheduler(**WAN_SCHEDULER))
    else:
        vae = build_seeded(lambda: AutoencoderKLLTXVideo(**LTX_TINY_VAE), seed + 1, dtype, keep_buffers=True)
        text = _text_encoder(family, config["caption_channels"], len(tokenizer), seed + 2, dtype)
        pipe = LTXPipeline(tokenizer=tokenizer, text_encoder=text, vae=vae, transformer=transformer,
                           scheduler=FlowMatchEulerDiscreteScheduler(**LTX_SCHEDULER))
    pipe.set_progress_bar_config(disable=True)
    pipe.text_tokens = entry["text_tokens"]
    return pipe

"""Mechanism probe of VidToMe on random weights: one chunk, consistent frames, several sharpening scales.

For a model (default tiny; sd15 under `flock /tmp/tomesd_heavy.lock`): 4 frames of the synthetic
moving-shapes clip, noised to timestep T with ONE noise shared by all frames, one guided UNet call
(CFG 7.5) as ONE chunk, per-frame attention vs VidToMe (defaults, seed 0); prints the frame-to-frame
change of the noise prediction (tomesd_ext.bench.video.probe) and the normalised entropy of
the first self-attention, for each sharpening scale (tomesd_ext.models.sharpen_self_attention).

Run (from the repo root): PYTHONPATH=. python scripts/vidtome_probe.py [--model sd15] [--size 256] [--scales 0,2,4] [--t 251]
"""
import argparse

import torch

from tomesd_ext.bench.video.probe import one_chunk_eps_change, shared_noise_latents
from tomesd_ext.video import VideoEditor, moving_shapes
from tomesd_ext.video.models import load_pipeline


def first_attn1_entropy(editor, x, t, emb):
    """Normalised entropy (1 = uniform) of the first transformer block's self-attention, sample 0."""
    from diffusers.models.attention import BasicTransformerBlock

    block = next(m for m in editor.unet.modules() if isinstance(m, BasicTransformerBlock))
    seen = {}

    def grab(module, args, kwargs):
        seen.setdefault("x", args[0] if args else kwargs["hidden_states"])

    handle = block.attn1.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        editor._eps(x, t, emb, None, None, 1.0, 7.5)
    finally:
        handle.remove()
    a, hs = block.attn1, seen["x"][:1]
    with torch.no_grad():
        p = a.get_attention_scores(a.head_to_batch_dim(a.to_q(hs)), a.head_to_batch_dim(a.to_k(hs)))
    return float(-(p * p.clamp_min(1e-12).log()).sum(-1).mean() / torch.log(torch.tensor(float(p.shape[-1]))))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--scales", default="0,2,4")
    ap.add_argument("--t", type=int, default=251)
    args = ap.parse_args()
    for scale in [float(v) for v in args.scales.split(",")]:
        pipe = load_pipeline(args.model, sharpen=scale)
        editor = VideoEditor(pipe)
        x = shared_noise_latents(editor.scheduler, editor.encode(moving_shapes(4, args.size)), args.t, seed=0)
        t = torch.tensor(args.t)
        emb = editor.embed("a watercolor painting", "ugly, blurry, low res")
        change = {m: one_chunk_eps_change(editor, x, t, emb, vidtome_seed=seed)
                  for m, seed in (("per-frame", None), ("vidtome", 0))}
        print(f"{args.model} sharpen {scale:g}: attn1 entropy {first_attn1_entropy(editor, x, t, emb):.3f}, "
              f"noise-prediction frame change per-frame {change['per-frame']:.3e}, vidtome {change['vidtome']:.3e} "
              f"(x{change['vidtome'] / change['per-frame']:.3f})", flush=True)
        del pipe, editor


if __name__ == "__main__":
    main()

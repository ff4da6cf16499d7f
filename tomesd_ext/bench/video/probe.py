"""Mechanism probes of VidToMe: one guided UNet step on consistent frames.

Every frame's latent is noised with ONE noise shared by all frames, so without merging the
frames differ only by their content; the frame-to-frame change of the guided noise prediction
(tomesd_ext.video.frame_difference) then shows what VidToMe's shared attention outputs do, free
of the DDIM chain.
"""

from __future__ import annotations

import torch


def shared_noise_latents(scheduler, latents: torch.Tensor, timestep: int, seed: int) -> torch.Tensor:
    """latents (F, 4, h, w) noised to `timestep` with one seeded (1, 4, h, w) noise shared by all
    F frames; returns (F, 4, h, w)."""
    noise = torch.randn(latents[:1].shape, generator=torch.Generator().manual_seed(seed)).to(latents)
    return scheduler.add_noise(latents, noise.expand_as(latents), torch.tensor([timestep]))


def probe(editor, latents: torch.Tensor, settings) -> dict:
    """Frame change of the guided noise prediction of one generation step at settings.probe_t, per
    method, with the generation's chunking. latents: (F, 4, h, w) clean latents of the clip."""
    from ...video import frame_difference
    from .settings import METHODS

    x = shared_noise_latents(editor.scheduler, latents, settings.probe_t, settings.seed)
    t = torch.tensor([settings.probe_t])
    out = {"timestep": settings.probe_t}
    for m in METHODS:
        got = []
        editor.generate(x, t, settings.edit_prompt, settings.edit_settings(m),
                        on_eps=lambda i, eps: got.append(frame_difference(eps)))
        out[m] = got[0]
    out["ratio_vidtome_over_perframe"] = out["vidtome"] / out["per-frame"]
    return out


def one_chunk_eps_change(editor, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor, vidtome_seed=None,
                         guidance: float = 7.5) -> float:
    """Frame change of the guided noise prediction of ONE UNet call on all F frames of x
    (F, 4, h, w) as one chunk (local tokens 2 frames apart); vidtome_seed None = per-frame
    attention, else VidToMe (defaults) seeded with it. emb: (2, 77, C) uncond/cond embeddings."""
    from ...diffusers.vidtome import apply_vidtome, remove_vidtome, vidtome_state
    from ...video import frame_difference

    if vidtome_seed is not None:
        apply_vidtome(editor.unet, seed=vidtome_seed)
        vidtome_state(editor.unet).set_chunk(range(x.shape[0]), 2, step=0)
    try:
        return frame_difference(editor._eps(x, t, emb, None, None, 1.0, guidance))
    finally:
        remove_vidtome(editor.unet)

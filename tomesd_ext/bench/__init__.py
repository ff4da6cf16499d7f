"""`tomesd-ext bench`: speed, memory and fidelity of merging methods side by side.

inputs (latents, conditioning), latent_map (fixed RGB <-> latent map), metrics (rel_error, PSNR,
SSIM), timing (timer, peak memory), methods (name -> apply/remove registry), subject (loading the
model), runner (the interleaved measurement loop), report/plot/grid (table, JSON, figures).
It measures; it never decides.
"""

"""All measurement of the project: `tomesd-ext bench` (images), `tomesd-ext bench-video` and the
micro-benches; the front ends (tomesd_ext/commands) only parse arguments.

Meters (one each): timing (timed, interleaved rounds, summary), memory (PeakMemory: peak RSS /
CUDA allocation increase of a block).
Image bench: inputs (latents, conditioning), latent_map (fixed RGB <-> latent map), metrics
(rel_error, PSNR, SSIM), methods (name -> apply/remove registry), subject (loading the model: a
UNet or a diffusion transformer), flow (the rectified-flow noise schedule of transformers),
runner (the interleaved measurement loop), report/plot/grid (table, JSON, figures); video
transformers: video_inputs (clips mapped to video latents), equal_error (ratios at equal error).
Micro-benches: micro (merging operators alone, `bench --micro`), breakeven (auto-skip rule),
importance_overhead, parts (time per transformer-block part; first-block timer of transformers).
Video bench: the video/ package.
It measures; it never decides.
"""

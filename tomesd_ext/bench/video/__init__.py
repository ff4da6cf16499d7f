"""The video bench (`tomesd-ext bench-video`): per-frame editing vs VidToMe on the same clip,
seed and settings.

settings (what to measure), clips (the input clips), measure (the per-clip loop: warp error,
time per frame, peak memory, noise-prediction frame change), probe (one-step mechanism probes),
fresh_memory (peak memory at several video lengths, one fresh process each), report (table,
JSON, plot). Timing and memory use the benches' one meter each (bench/timing.py, bench/memory.py).
"""

from .measure import run_video_bench
from .settings import METHODS, VideoBenchSettings

__all__ = ["METHODS", "VideoBenchSettings", "run_video_bench"]

"""What the video bench measures: one settings object, built by the command line or by code."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Union

# method name -> EditSettings.vidtome (None = per-frame attention, {} = VidToMe defaults)
METHODS = {"per-frame": None, "vidtome": {}}


@dataclass
class VideoBenchSettings:
    model: str = "tiny"  # built-in model name or local checkpoint
    clips: List[str] = field(default_factory=lambda: ["gif", "shapes"])  # gif, shapes or paths
    frames: int = 8  # frames per clip
    size: int = 256  # short side in pixels (multiple of 8)
    steps: int = 6  # DDIM steps (inversion and generation)
    mode: str = "invert"  # invert | sdedit
    chunk_size: int = 4
    seed: int = 0
    repeats: int = 1  # timed generations per method (interleaved)
    memory_frames: List[int] = field(default_factory=list)  # video lengths of the peak-memory check
    memory_steps: int = 1  # generation steps of the memory check
    source_prompt: str = "a video"
    edit_prompt: str = "a watercolor painting"
    sharpen: Union[str, float, None] = "auto"  # resolved by tomesd_ext.video.models.resolve_sharpen
    probe_t: int = 251  # timestep of the one-call probe; -1 = off

    def edit_settings(self, method: str):
        """The EditSettings of one method (per-frame or vidtome)."""
        from ...video import EditSettings

        return EditSettings(mode=self.mode, steps=self.steps, seed=self.seed, chunk_size=self.chunk_size,
                            vidtome=METHODS[method])

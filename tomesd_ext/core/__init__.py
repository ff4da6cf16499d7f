"""Core algorithms: pure tensor functions and the runtime, no diffusers or ComfyUI imports.

x: (B, N, C) tokens of an h x w grid (row-major). A MergePlan maps N tokens to N - r groups;
merge() averages each group (or copies its representative), unmerge() copies the group's value
back to its members. ``MergeRuntime`` (runtime.py) holds the call state, plan cache and policy of
one patched denoiser: ``TomePolicy``, ``ImportancePolicy``, ``VidToMePolicy`` or ``ToDoPolicy``.
"""

from .downsample import TODO_OPTIONS, ToDoOptions, ToDoPolicy, downsample_tokens, downsampled_size
from .grid import level_grid, tokens_to_remove
from .importance import (
    NO_CFG_WARNING,
    ImportancePolicy,
    detect_cfg_layout,
    read_call,
    importance_map,
    importance_map_from_x0,
    importance_partitions,
    importance_plan,
    max_importance_ratio,
    pool_to_grid,
    pool_to_video_grid,
    shared_token_map,
)
from .matching import bipartite_plan, normalize_metric, plan_from_matches
from .merge import merge, unmerge
from .options import TOME_OPTIONS, Option, OptionError, ToMeOptions
from .partition import derive_seed, timestep_key, window_partition
from .plan import MergePlan
from .plan_cache import PlanCache
from .runtime import BlockSlot, MergeRuntime
from .temporal import (
    ChunkDraw,
    VidToMePolicy,
    chunk_draw,
    chunk_frames,
    chunked_temporal_attention,
    step_schedule,
    temporal_attention,
)
from .temporal_options import VIDTOME_OPTIONS, VidToMeOptions
from .tome import TomePolicy, partition_seed, tome_plan

__all__ = [
    "NO_CFG_WARNING",
    "TODO_OPTIONS",
    "TOME_OPTIONS",
    "VIDTOME_OPTIONS",
    "BlockSlot",
    "ChunkDraw",
    "ImportancePolicy",
    "MergePlan",
    "MergeRuntime",
    "Option",
    "OptionError",
    "PlanCache",
    "ToDoOptions",
    "ToDoPolicy",
    "ToMeOptions",
    "TomePolicy",
    "VidToMeOptions",
    "VidToMePolicy",
    "bipartite_plan",
    "chunk_draw",
    "chunk_frames",
    "chunked_temporal_attention",
    "derive_seed",
    "detect_cfg_layout",
    "read_call",
    "downsample_tokens",
    "downsampled_size",
    "importance_map",
    "importance_map_from_x0",
    "importance_partitions",
    "importance_plan",
    "level_grid",
    "max_importance_ratio",
    "merge",
    "normalize_metric",
    "partition_seed",
    "plan_from_matches",
    "pool_to_grid",
    "pool_to_video_grid",
    "shared_token_map",
    "step_schedule",
    "temporal_attention",
    "timestep_key",
    "tokens_to_remove",
    "tome_plan",
    "unmerge",
    "window_partition",
]

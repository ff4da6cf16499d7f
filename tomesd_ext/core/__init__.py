"""Core algorithms: pure tensor functions, no diffusers or ComfyUI imports.

x: (B, N, C) tokens of an h x w grid (row-major). A MergePlan maps N tokens to N - r groups;
merge() averages each group, unmerge() copies the group's value back to its members.
"""

from .downsample import ToDoOptions, downsample_tokens, downsampled_size
from .grid import level_grid, tokens_to_remove
from .importance import ImportancePlanner, importance_map, importance_partitions, importance_plan, max_importance_ratio, pool_to_grid
from .matching import bipartite_plan, normalize_metric
from .merge import merge, unmerge
from .options import OptionError, ToMeOptions
from .partition import derive_seed, timestep_key, window_partition
from .plan import MergePlan
from .plan_cache import PlanCache
from .temporal import (
    ChunkDraw,
    ReplacePlan,
    chunk_draw,
    chunk_frames,
    chunked_temporal_attention,
    merges_level,
    temporal_attention,
)
from .temporal_options import VidToMeOptions
from .tome import level_plan, partition_seed, tome_plan

__all__ = [
    "ChunkDraw",
    "ReplacePlan",
    "VidToMeOptions",
    "chunk_draw",
    "chunk_frames",
    "chunked_temporal_attention",
    "merges_level",
    "temporal_attention",
    "MergePlan",
    "OptionError",
    "PlanCache",
    "ToDoOptions",
    "ToMeOptions",
    "bipartite_plan",
    "derive_seed",
    "ImportancePlanner",
    "importance_map",
    "importance_partitions",
    "importance_plan",
    "downsample_tokens",
    "downsampled_size",
    "level_grid",
    "level_plan",
    "max_importance_ratio",
    "merge",
    "normalize_metric",
    "partition_seed",
    "pool_to_grid",
    "timestep_key",
    "tokens_to_remove",
    "tome_plan",
    "unmerge",
    "window_partition",
]

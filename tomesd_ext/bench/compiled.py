"""Configurations that keep their own denoiser: built once, reused by every call of the runner.

The runner applies a method before each call and removes it after (runner.applied). A compiled
configuration cannot work that way: re-compiling around every call would measure compilation.
A method with ``build`` (methods.Method) instead gets its own copy of the unpatched denoiser,
made at its first use at a resolution (``build(model, ratio, ctx)``: copy.deepcopy, patch,
``Module.compile()``) and kept until the runner moves to the next resolution (``clear``), so
at most one copy per such configuration is held at a time (memory: docs/bench.md).

The copies share code objects, and dynamo's compiled code is cached per code object behind
guards. By default dynamo does not guard on module hooks (skip_nnmodule_hook_guards), where our
transformer merging lives; the patch makes itself visible to guards (a pass-through processor
wrapper, diffusers/dit.py), and while copies exist hooks are guarded too, so that no
configuration can run another's graph (the setting is restored by ``clear``).

Per configuration it records, from torch._dynamo's counters:
- ``compile_seconds``: the wall time of its first call (the one that compiles; untimed by the
  runner: the warm-up's call, or a call of its own with --warmup 0);
- ``graph_breaks``: graph breaks dynamo reported while compiling that first call
  (counters["graph_break"], summed over reasons);
- ``graphs``: graphs dynamo compiled in that first call (counters["stats"]["unique_graphs"]);
- ``recompiles``: graphs compiled during the measured calls (fidelity pass and timed rounds),
  0 when the compiled code is reused as it should be;
- ``recompiles_warmup``: graphs compiled during its other untimed calls (later warm-up rounds,
  the settling call of runner.py).
"""

from __future__ import annotations

import contextlib
import time
from typing import Dict, Tuple

from .timing import synchronize


def dynamo_counts() -> Tuple[int, int]:
    """(graphs compiled, graph breaks) so far in this process (torch._dynamo counters)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"]), int(sum(counters["graph_break"].values()))


class OwnDenoisers:
    """The built denoisers of one resolution, keyed by (method, ratio), and their compile stats."""

    def __init__(self, model, ctx, device="cpu"):
        self.model, self.ctx, self.device = model, ctx, device
        self.models: Dict[tuple, object] = {}
        self.stats: Dict[tuple, dict] = {}
        self.measuring = False  # set by the runner once warm-up (and the first calls) are done
        self._hook_guards = None  # dynamo's skip_nnmodule_hook_guards before the first copy

    def get(self, method, ratio):
        key = (method.name, ratio)
        if key not in self.models:
            if self._hook_guards is None:
                import torch._dynamo

                self._hook_guards = torch._dynamo.config.skip_nnmodule_hook_guards
                torch._dynamo.config.skip_nnmodule_hook_guards = False
            self.models[key] = method.build(self.model, ratio, self.ctx)
        return self.models[key]

    def called(self, name: str, ratio) -> bool:
        return (name, ratio) in self.stats

    @contextlib.contextmanager
    def counting(self, name: str, ratio):
        """Around one call of configuration (name, ratio): the first is the compile call;
        graphs compiled in later calls count as recompiles once ``measuring`` is set."""
        key = (name, ratio)
        graphs, breaks = dynamo_counts()
        synchronize(self.device)
        start = time.perf_counter()
        yield
        synchronize(self.device)
        seconds = time.perf_counter() - start
        graphs_now, breaks_now = dynamo_counts()
        if key not in self.stats:
            self.stats[key] = {"compile_seconds": seconds, "graph_breaks": breaks_now - breaks,
                               "graphs": graphs_now - graphs, "recompiles": 0, "recompiles_warmup": 0}
        else:
            self.stats[key]["recompiles" if self.measuring else "recompiles_warmup"] += graphs_now - graphs

    def clear(self) -> None:
        """Drop the copies, their stats and dynamo's compiled code (so its per-code cache limit
        is not spent on copies that are gone): the next resolution builds and compiles anew."""
        self.stats.clear()
        if self.models:
            import torch

            self.models.clear()
            torch._dynamo.reset()
        if self._hook_guards is not None:
            import torch._dynamo

            torch._dynamo.config.skip_nnmodule_hook_guards = self._hook_guards
            self._hook_guards = None

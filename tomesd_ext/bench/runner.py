"""The measurement loop: warm-up, one fidelity/memory pass, then interleaved timed repeats.

For every resolution:
1. `warmup` untimed rounds of every configuration (method, ratio) on the first input;
2. one call per (input, configuration) with the peak-memory probe; its output is compared with
   the baseline's on the same input (rel_error, PSNR, SSIM);
3. `repeats` timed rounds, each running every configuration once, interleaved (A/B/C, then
   B/C/A, ...) so noise on a shared machine hits all alike; round i uses input i mod #inputs.
   Speed does not depend on the input's content, so a configuration's timings pool all inputs.
   Diffusion transformers: the timed calls also time the first block of each kind
   (parts.block_timer), reported per row as `block_seconds` (median per block call).
   repeats = 0 times the calls of step 2 instead (for long runs; documented in the header),
   after one untimed baseline call when there is no warm-up, so nothing is timed cold.
Rows: one per (method, ratio, resolution, input); the JSON is rewritten after every row. A row's
ratio is the one the patched model ran (Method.effective_ratio: a ratio above the method's
maximum is clamped), ratio_requested the --ratios value.
Video transformers: a resolution is (height, width) of clips of the subject's frames (the row's
resolution "HxW", with frames and tokens); rows add temporal, the output's frame-to-frame change
relative to the baseline's (metrics.frame_change).
Methods with a probe (fbcache: cache_hits) fill row fields during the fidelity pass.
Methods with build (compile, tome+compile; compiled.py) call their own compiled copy instead of
being applied around each call; their first call at a resolution compiles it and is never timed
(warm-up's, or one call of its own before the fidelity pass with --warmup 0). The copies share
dynamo's per-code caches (one copy's graph breaks compile frames another copy then meets), so
with two or more of them each gets one more untimed call after all have compiled (unless
--warmup >= 2 did that). Rows add compile_seconds, graph_breaks, recompiles (graphs compiled
during the measured calls) and recompiles_warmup (during its other untimed calls).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

from . import metrics
from .compiled import OwnDenoisers
from .denoise import denoise
from .equal_error import equal_error, equal_error_text
from .methods import BASELINE, MethodContext, get_method
from .micro import micro, micro_table
from .parts import block_timer
from .report import block_table, header, stack_table, table, write_json
from .memory import PeakMemory
from .timing import round_order, summary, timed


@dataclass
class BenchSettings:
    resolutions: Sequence  # px: int (square images) or (height, width) (video transformers)
    methods: Sequence[str]  # without baseline (it is always measured)
    ratios: Sequence[float]
    batch: int = 2
    repeats: int = 3
    warmup: int = 1
    steps: int = 0
    timestep: int = 500
    seed: int = 0
    inputs: Sequence[str] = ("photo", "noise")
    micro: bool = False  # also time the merging operators alone (micro.py), per resolution and ratio
    equal_error: Optional[tuple] = None  # (method, ratio): report the ratio each method reaches at its error
    compile_backend: str = "inductor"  # torch.compile backend of compile / tome+compile
    cache_threshold: float = 0.05  # FirstBlockCache threshold of fbcache / tome+fbcache
    min_tokens: Optional[int] = None  # ours' auto-skip threshold (None: the library's default)
    clock: str = "wall"  # timing.CLOCKS: wall-clock or process CPU seconds

    def configs(self):
        """(method, ratio) pairs: baseline first, ratio None for methods without a ratio."""
        out = [(BASELINE, None)]
        for name in self.methods:
            if get_method(name).uses_ratio:
                out += [(name, r) for r in self.ratios]
            else:
                out.append((name, None))
        return out

    def as_header(self) -> dict:
        return {
            "batch": self.batch, "steps": self.steps, "timestep": self.timestep, "repeats": self.repeats,
            "warmup": self.warmup, "seed": self.seed, "inputs": list(self.inputs), "micro": self.micro,
            "equal_error": None if self.equal_error is None else f"{self.equal_error[0]}:{self.equal_error[1]:g}",
            "compile_backend": self.compile_backend, "cache_threshold": self.cache_threshold,
            "min_tokens": self.min_tokens, "clock": self.clock,
            "cfg": self.batch % 2 == 0, "images_per_batch": self.batch // 2 if self.batch % 2 == 0 else self.batch,
            "peak_memory": "extra memory of one call above what was held before it (CUDA: max_memory_allocated; CPU: peak RSS sampled every 1 ms)",
            "input_latents": "VAE encoder (real weights) or the fixed linear map of tomesd_ext/bench/latent_map.py",
            "timing": "interleaved rounds after warm-up; a configuration's timings pool all inputs"
            if self.repeats else "repeats 0: timings of the fidelity/memory pass (one call per input, memory probe running; one untimed baseline call before it)",
        }


@dataclass
class BenchResult:
    document: dict
    images: Dict[tuple, Dict[str, object]] = field(default_factory=dict)  # (resolution, input) -> label -> image


def size_label(res):
    """A resolution as rows and tables show it: 512, or "480x832" for a (height, width) pair."""
    return res if isinstance(res, int) else f"{res[0]}x{res[1]}"


def label(method: str, ratio: Optional[float]) -> str:
    return method if ratio is None else f"{method} {ratio:g}"


@contextlib.contextmanager
def applied(model, method: str, ratio, ctx: MethodContext):
    m = get_method(method)
    m.apply(model, ratio, ctx)
    try:
        yield
    finally:
        m.remove(model)


@contextlib.contextmanager
def configured(subject, method: str, ratio, ctx: MethodContext, own: OwnDenoisers):
    """The subject to call for configuration (method, ratio): the shared denoiser with the method
    applied (removed on exit), or, for a method with build, its own kept denoiser."""
    m = get_method(method)
    if m.build is None:
        with applied(subject.denoiser, method, ratio, ctx):
            yield subject
        return
    model = own.get(m, ratio)
    with own.counting(method, ratio):
        yield dataclasses.replace(subject, denoiser=model)


@contextlib.contextmanager
def probed(subject, method: str):
    """Row fields a method's probe fills during one call ({} without a probe)."""
    probe = get_method(method).probe
    if probe is None:
        yield {}
        return
    with probe(subject.denoiser) as fields:
        yield fields


def attention_backend(model) -> str:
    for module in model.modules():
        processor = getattr(module, "processor", None)
        if processor is not None and hasattr(module, "to_q"):
            return type(processor).__name__ + " (torch scaled_dot_product_attention)" * ("2_0" in type(processor).__name__)
    return "unknown"


def run_bench(
    subject,
    settings: BenchSettings,
    json_path: Optional[str] = None,
    progress: bool = True,
    after_row: Optional[Callable[[dict], None]] = None,
    out: Callable[[str], None] = print,
) -> BenchResult:
    """Measure every configuration at every resolution; returns the JSON document and images."""
    from tqdm.auto import tqdm

    from ..diffusers.discovery import resolve_max_downsample

    model = subject.denoiser
    doc = {"header": header(subject, settings.as_header(), attention_backend(model)), "rows": []}
    result = BenchResult(doc)
    configs = settings.configs()
    cfg = settings.batch % 2 == 0
    n_images = settings.batch // 2 if cfg else settings.batch
    ctx = MethodContext(seed=settings.seed, max_downsample=None if subject.is_dit else resolve_max_downsample(model, "auto"),
                        compile_backend=settings.compile_backend, cache_threshold=settings.cache_threshold,
                        min_tokens=settings.min_tokens)
    for method in settings.methods:
        reason = get_method(method).supports(model)
        if reason:
            raise ValueError(f"--methods {method}: {reason}")
    built = [c for c in configs if get_method(c[0]).build is not None]
    calls = len(configs) * (settings.warmup + len(settings.inputs) + settings.repeats)
    calls += settings.repeats == 0 and settings.warmup == 0
    calls += len(built) * (settings.warmup == 0) + len(built) * (len(built) > 1 and settings.warmup < 2)
    bar = tqdm(total=calls * len(settings.resolutions), disable=not progress, desc="bench", unit="call")

    def call(method, ratio, inp, cond, who=subject):
        bar.set_postfix_str(f"{label(method, ratio)} {inp.name}")
        return denoise(who, inp, cond, cfg, settings.steps, settings.timestep)

    own = OwnDenoisers(model, ctx, subject.device)
    try:
        for res in settings.resolutions:
            inputs = [subject.bench_input(k, n_images, res, settings.seed) for k in settings.inputs]
            cond = subject.conditioning(n_images, cfg, res, settings.seed)
            own.clear()
            own.measuring = False
            for _ in range(settings.warmup):
                for method, ratio in configs:
                    with configured(subject, method, ratio, ctx, own) as who:
                        call(method, ratio, inputs[0], cond, who)
                    bar.update()
            for method, ratio in built:  # --warmup 0: the compiling call, untimed
                if not own.called(method, ratio):
                    with configured(subject, method, ratio, ctx, own) as who:
                        call(method, ratio, inputs[0], cond, who)
                    bar.update()
            if len(built) > 1 and settings.warmup < 2:  # settle: compiled copies share dynamo's code caches
                for method, ratio in built:
                    with configured(subject, method, ratio, ctx, own) as who:
                        call(method, ratio, inputs[0], cond, who)
                    bar.update()
            own.measuring = True
            if settings.repeats == 0 and settings.warmup == 0:
                call(BASELINE, None, inputs[0], cond)  # the timed pass must not start cold
                bar.update()
            fidelity, ran = {}, {}  # ran: (method, ratio) -> the ratio the patched model runs
            first_pass: Dict[tuple, List[float]] = {c: [] for c in configs}
            for inp in inputs:
                reference = None
                for method, ratio in configs:
                    with configured(subject, method, ratio, ctx, own) as who, probed(who, method) as fields, \
                            PeakMemory(subject.device) as mem:
                        output, s = timed(lambda: call(method, ratio, inp, cond, who), subject.device, settings.clock)
                        ran[(method, ratio)] = None if ratio is None else get_method(method).effective_ratio(who.denoiser, ratio)
                    first_pass[(method, ratio)].append(s)
                    bar.update()
                    reference = reference or (output, [metrics.to_image(x) for x in subject.decode(output.image_latent)])
                    fidelity[(method, ratio, inp.name)] = _fidelity(subject, output, reference, mem.mb, result, size_label(res), inp.name, label(method, ratio))
                    fidelity[(method, ratio, inp.name)].update(fields)
            seconds: Dict[tuple, List[float]] = {c: [] for c in configs}
            blocks: Dict[tuple, Dict[str, List[float]]] = {c: {} for c in configs}
            for rep in range(settings.repeats):
                inp = inputs[rep % len(inputs)]
                for method, ratio in round_order(configs, rep, "rotate"):
                    with configured(subject, method, ratio, ctx, own) as who, block_timer(model) as block_times:  # built copies: not timed per block
                        _, s = timed(lambda: call(method, ratio, inp, cond, who), subject.device, settings.clock)
                    seconds[(method, ratio)].append(s)
                    for name, times in block_times.items():
                        blocks[(method, ratio)].setdefault(name, []).extend(times)
                    bar.update()
            if settings.repeats == 0:
                seconds = first_pass
            base = summary(seconds[(BASELINE, None)])["seconds_median"]
            new_rows = []
            for inp in inputs:
                for method, ratio in configs:
                    stats = summary(seconds[(method, ratio)])
                    row = {
                        "method": method, "ratio": ran[(method, ratio)], "ratio_requested": ratio,
                        "resolution": size_label(res), "batch": settings.batch,
                        **stats, "speedup": base / stats["seconds_median"],
                        **fidelity[(method, ratio, inp.name)], "input": inp.name, "steps": settings.steps,
                    }
                    if subject.is_video:
                        row.update(_video_geometry(subject, inputs[0]))
                    if subject.is_dit:
                        row["block_seconds"] = {k: summary(v)["seconds_median"] for k, v in blocks[(method, ratio)].items() if v} or None
                    if (method, ratio) in own.stats:
                        row.update({k: v for k, v in own.stats[(method, ratio)].items() if k != "graphs"})
                    doc["rows"].append(row)
                    new_rows.append(row)
                    if json_path:
                        write_json(json_path, doc)
                    if after_row:
                        after_row(row)
            bar.clear()
            clip = f", {subject.frames} frames ({new_rows[0]['tokens']} tokens)" if subject.is_video else ""
            out(table(new_rows, f"\n{subject.name} {size_label(res)}px{clip}, batch {settings.batch}, steps {settings.steps}"))
            if any(r.get("block_seconds") for r in new_rows):
                out(block_table(new_rows))
            if any("cache_hits" in r or "compile_seconds" in r for r in new_rows):
                out(stack_table(new_rows))
            if settings.micro:
                micro_rows = [micro(model.config, res, settings.batch, r, subject.device, subject.dtype, seed=settings.seed)
                              for r in settings.ratios]
                doc.setdefault("micro", []).extend(micro_rows)
                if json_path:
                    write_json(json_path, doc)
                out(micro_table(micro_rows))
        if settings.equal_error:
            doc["equal_error"] = equal_error(doc["rows"], *settings.equal_error)
            if json_path:
                write_json(json_path, doc)
            out(equal_error_text(doc["equal_error"]))
    finally:
        bar.close()
        own.clear()
    return result


def _video_geometry(subject, inp) -> dict:
    """frames (pixel), latent_frames and tokens (the transformer's token grid) of a video row."""
    _, _, f, h, w = inp.noise.shape
    if not subject.is_dit:  # AnimateDiff: frames of latent tokens at the UNet's first level
        return {"frames": subject.frames, "latent_frames": f, "tokens": f * h * w}
    patch = subject.denoiser.config.patch_size
    pt, ph, pw = tuple(patch) if isinstance(patch, (list, tuple)) else (getattr(subject.denoiser.config, "patch_size_t", 1), patch, patch)
    return {"frames": subject.frames, "latent_frames": f, "tokens": (f // pt) * (h // ph) * (w // pw)}


def _fidelity(subject, output, reference, mem_mb, result, res, input_name, config_label) -> dict:
    ref_out, ref_images = reference
    images = [metrics.to_image(x) for x in subject.decode(output.image_latent)]
    result.images.setdefault((res, input_name), {})[config_label] = images[0]
    psnrs = [metrics.psnr(a, b) for a, b in zip(images, ref_images)]
    finite = [p for p in psnrs if p is not None]
    video = {}
    if subject.is_video:
        change = metrics.frame_change(output.noise_pred)
        video = {"frame_change": change, "temporal": change / metrics.frame_change(ref_out.noise_pred)}
    return {**video,
        "peak_mem_mb": mem_mb,
        "rel_error": metrics.rel_error(output.noise_pred, ref_out.noise_pred),
        "rel_error_latent": None if output.final is None else metrics.rel_error(output.final, ref_out.final),
        "psnr": sum(finite) / len(finite) if finite else None,
        "ssim": sum(metrics.ssim(a, b) for a, b in zip(images, ref_images)) / len(images),
    }

"""apply_tome beside diffusers' caches (enable_cache: FirstBlockCache, MagCache, TaylorSeer, SeaCache; PAB on a UNet).

A cache acts across the calls of a sampling loop, so every check runs a few sampler-like calls
(falling timestep, latent moving a little) and compares whole runs bit for bit. Between runs the
cache state is reset as a pipeline does at the end of each call (``_reset_stateful_cache``).
"""

import logging

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import FirstBlockCacheConfig, MagCacheConfig, SeaCacheConfig, TaylorSeerCacheConfig  # noqa: E402

from tomesd_ext import apply_tome, remove_tome  # noqa: E402
from tomesd_ext.diffusers.dit_families import family_of  # noqa: E402

from .dit_models import VIDEO_FAMILIES, make, make_video  # noqa: E402

STEPS = 6
# where FirstBlockCache skips some steps of sample_loop and computes others (tiny random models)
FBC_THRESHOLD = {"flux": 0.3, "wan": 0.05, "qwen-image": 0.3, "hunyuan-video": 0.2, "ltx-video": 0.05}
MODES = ("block", "attn", "kv")


def build(family):
    if family in VIDEO_FAMILIES:
        return make_video(family, frames=3, h=4, w=4, layers=4)
    return make(family, batch=1, h=8, w=8, layers=4)


def config(kind, family):
    if kind == "fbc":
        return FirstBlockCacheConfig(threshold=FBC_THRESHOLD[family])
    if kind == "sea":
        return SeaCacheConfig(threshold=0.2)
    if kind == "mag":  # flat ratios: after the first step, every other step is skipped (max_skip_steps=1)
        return MagCacheConfig(mag_ratios=torch.ones(STEPS), num_inference_steps=STEPS, max_skip_steps=1, retention_ratio=0.2)
    # diffusers' default TaylorSeer patterns match "...attn", not Wan's "attn1": name them
    names = [r"blocks\.\d+\.attn1"] if family == "wan" else None
    return TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=2, taylor_factors_dtype=torch.float32, cache_identifiers=names)


def first_linear(attn):
    return next(mod for mod in attn.modules() if isinstance(mod, torch.nn.Linear))


class Computed:
    """Counts the calls of the last block's attention that really ran (its first projection runs
    only when neither a block cache nor an attention cache skipped it), and the token lengths
    every block's attention saw."""

    def __init__(self, m):
        self.n, self.lengths = 0, {}
        fam = family_of(m)
        blocks = [(spec, b) for spec in fam.lists for b in getattr(m, spec.name)]
        for i, (spec, block) in enumerate(blocks):
            q = first_linear(getattr(block, spec.attentions[0]))
            q.register_forward_pre_hook(lambda mod, args, i=i: self.lengths.setdefault(i, []).append(args[0].shape[1]))
        last = first_linear(getattr(blocks[-1][1], blocks[-1][0].attentions[0]))
        last.register_forward_pre_hook(lambda *a: setattr(self, "n", self.n + 1))

    def reset(self):
        self.n, self.lengths = 0, {}


def sample_loop(m, kw, sample, computed=None, steps=STEPS):
    """A sampler's calls: the timestep falls and the latent moves a little each step."""
    if computed is not None:
        computed.reset()
    kw, t, outs = dict(kw), kw["timestep"], []
    for i in range(steps):
        kw["timestep"] = (t.float() * (1 - 0.4 * i / steps)).to(t.dtype)
        with torch.no_grad(), m.cache_context("cond", step_index=i, sigma=1 - 0.4 * i / steps, num_inference_steps=steps):
            out = sample(m(**kw))
        outs.append(out)
        kw["hidden_states"] = kw["hidden_states"] - 0.01 * out.reshape(kw["hidden_states"].shape)
    m._reset_stateful_cache()  # what a pipeline does at the end of its call (maybe_free_model_hooks)
    return torch.stack(outs)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ("fbc", "mag", "ts"))
@pytest.mark.parametrize("family", ("flux", "wan"))
def test_tome_beside_a_cache_either_order_and_either_removed(family, kind, mode):
    m, kw, sample = build(family)
    computed = Computed(m)
    opts = dict(ratio=0.5, dit_mode=mode, seed=0, min_tokens=0)

    apply_tome(m, **opts)
    only_tome = sample_loop(m, kw, sample)
    remove_tome(m)
    m.enable_cache(config(kind, family))
    only_cache = sample_loop(m, kw, sample, computed)
    assert computed.n < STEPS  # the cache skips work
    m.disable_cache()

    # ToMe first, then the cache
    apply_tome(m, **opts)
    m.enable_cache(config(kind, family))
    both = sample_loop(m, kw, sample, computed)
    assert computed.n < STEPS  # caching still happens while merging is on
    # block/attn merging under an attention cache (TaylorSeer) would feed it merged tokens of
    # another plan each step: those blocks stay unmerged; kv merges under it
    assert torch.equal(both, only_cache) == (kind == "ts" and mode != "kv")
    m.disable_cache()
    assert torch.equal(sample_loop(m, kw, sample), only_tome)  # ToMe alone again, exactly
    remove_tome(m)

    # the cache first, then ToMe: the same run; removing ToMe leaves the cache alone
    m.enable_cache(config(kind, family))
    apply_tome(m, **opts)
    assert torch.equal(sample_loop(m, kw, sample), both)
    remove_tome(m)
    assert torch.equal(sample_loop(m, kw, sample), only_cache)


@pytest.mark.parametrize("family", ("flux", "wan"))
@pytest.mark.parametrize("kind", ("fbc", "mag"))
def test_block_mode_leaves_the_cache_head_and_tail_unmerged(family, kind):
    # the first block's residual (FirstBlockCache's test, MagCache's input) and the last block's
    # output (the residual both replay) must be full-length tokens of this step
    m, kw, sample = build(family)
    computed = Computed(m)
    sample_loop(m, kw, sample, computed)
    full = {i: n[0] for i, n in computed.lengths.items()}  # tokens each block's attention sees unmerged
    last = max(full)
    apply_tome(m, 0.5, dit_mode="block", seed=0, min_tokens=0)
    m.enable_cache(config(kind, family))
    sample_loop(m, kw, sample, computed)
    seen = computed.lengths
    assert set(seen[0]) == {full[0]} and set(seen[last]) == {full[last]}
    between = [(i, n) for i in range(1, last) for n in seen.get(i, [])]
    assert between and all(n < full[i] for i, n in between)  # merging on in the blocks between


def test_attention_cache_block_mode_says_once_and_kv_merges(caplog):
    m, kw, sample = build("flux")
    m.enable_cache(config("ts", "flux"))
    apply_tome(m, 0.5, seed=0, min_tokens=0)  # the default mode (block)
    with caplog.at_level(logging.WARNING, logger="tomesd_ext"):
        sample_loop(m, kw, sample)
        sample_loop(m, kw, sample)
    said = [r for r in caplog.records if "dit_mode='kv'" in r.getMessage()]
    assert len(said) == 1
    computed = Computed(m)
    apply_tome(m, 0.5, dit_mode="kv", seed=0, min_tokens=0)
    sample_loop(m, kw, sample, computed)
    assert computed.n < STEPS


@pytest.mark.parametrize("family,kind,mode", (
    ("flux2", "mag", "block"),  # diffusers' FirstBlockCache fails on Flux.2 by itself (tuple head, tensor tail)
    ("qwen-image", "fbc", "block"), ("qwen-image", "mag", "attn"),
    ("hunyuan-video", "fbc", "kv"), ("hunyuan-video", "mag", "block"),
    ("ltx-video", "fbc", "attn"), ("ltx-video", "mag", "block"),
    ("wan", "sea", "block"), ("wan", "sea", "kv"),  # SeaCache reads Flux's packed latents as no image: it never skips there
))
def test_more_families_and_caches(family, kind, mode):
    m, kw, sample = build(family)
    computed = Computed(m)
    opts = dict(ratio=0.5, dit_mode=mode, seed=0, min_tokens=0)
    m.enable_cache(config(kind, family))
    only_cache = sample_loop(m, kw, sample, computed)
    assert computed.n < STEPS
    apply_tome(m, **opts)
    both = sample_loop(m, kw, sample, computed)
    assert computed.n < STEPS and torch.isfinite(both).all() and not torch.equal(both, only_cache)
    m.disable_cache()
    only_tome = sample_loop(m, kw, sample)
    remove_tome(m)
    m.enable_cache(config(kind, family))
    apply_tome(m, **opts)
    assert torch.equal(sample_loop(m, kw, sample), both)
    m.disable_cache()
    assert torch.equal(sample_loop(m, kw, sample), only_tome)
    remove_tome(m)
    m.enable_cache(config(kind, family))
    assert torch.equal(sample_loop(m, kw, sample), only_cache)


def test_unet_beside_pyramid_attention_broadcast():
    # diffusers' UNets have no enable_cache, and FirstBlockCache/MagCache find no block list there;
    # PAB matches attentions by name and applies. ToMe merges inside the attention processor, so
    # PAB keeps full-length attention outputs.
    from diffusers.hooks import HookRegistry, PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast

    from tomesd_ext.models import build_unet, sharpen_self_attention

    u = sharpen_self_attention(build_unet("tiny", seed=0)).eval()
    g = torch.Generator().manual_seed(1)
    x0, ctx = torch.randn(1, 4, 32, 32, generator=g), torch.randn(1, 5, u.config.cross_attention_dim, generator=g)
    now = {"t": 0}
    ran = [0]
    attn = next(mod for name, mod in u.named_modules() if name.endswith("attn1"))
    attn.to_q.register_forward_pre_hook(lambda *a: ran.__setitem__(0, ran[0] + 1))

    def loop():
        x, outs = x0, []
        ran[0] = 0
        for i in range(STEPS):
            now["t"] = 700 - 50 * i
            with torch.no_grad():
                out = u(x, now["t"], encoder_hidden_states=ctx).sample
            outs.append(out)
            x = x - 0.01 * out
        HookRegistry.check_if_exists_or_initialize(u).reset_stateful_hooks()  # no CacheMixin on a UNet
        return torch.stack(outs)

    def pab_on():
        apply_pyramid_attention_broadcast(u, PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(100, 800),
            current_timestep_callback=lambda: now["t"]))

    def pab_off():
        HookRegistry.check_if_exists_or_initialize(u).remove_hook("pyramid_attention_broadcast", recurse=True)

    opts = dict(ratio=0.5, seed=0, min_tokens=0)
    apply_tome(u, **opts)
    only_tome = loop()
    remove_tome(u)
    pab_on()
    only_pab = loop()
    assert ran[0] < STEPS
    apply_tome(u, **opts)  # PAB first, then ToMe
    both = loop()
    assert ran[0] < STEPS and not torch.equal(both, only_pab) and not torch.equal(both, only_tome)
    pab_off()
    assert torch.equal(loop(), only_tome)
    pab_on()  # ToMe first, then PAB: the same run
    assert torch.equal(loop(), both)
    remove_tome(u)
    assert torch.equal(loop(), only_pab)

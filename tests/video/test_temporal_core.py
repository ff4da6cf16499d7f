"""Core VidToMe merging: chunking, replace plans, local/global merges, shared CFG matches."""

import pytest
import torch

from tomesd_ext.core import OptionError, VidToMeOptions, chunk_draw, chunk_frames, merge, temporal_attention, unmerge
from tomesd_ext.core.temporal import ChunkDraw, global_plan, local_plan, replace_plan


@pytest.mark.parametrize("n_frames", [1, 2, 3, 4, 5, 8, 13, 32])
@pytest.mark.parametrize("chunk", [1, 3, 4, 8])
def test_chunks_cover_every_frame_once(n_frames, chunk):
    firsts = set()
    for step in range(12):
        chunks = chunk_frames(n_frames, chunk, seed=7, step_key=step)
        flat = sorted(f for c in chunks for f in c)
        assert flat == list(range(n_frames))
        assert all(1 <= len(c) <= chunk for c in chunks)
        assert all(c == list(range(c[0], c[0] + len(c))) for c in chunks)  # consecutive
        firsts.add(min(len(c) for c in chunks))
    if n_frames > chunk > 1:
        assert len(firsts) > 1  # borders move between steps


def test_chunking_is_seeded():
    assert chunk_frames(32, 4, 1, 5) == chunk_frames(32, 4, 1, 5)
    runs = {str(chunk_frames(32, 4, s, 5)) for s in range(6)}
    assert len(runs) > 1
    assert chunk_draw(3, 10, (4, 5, 6), 0.5) == chunk_draw(3, 10, (4, 5, 6), 0.5)
    assert len({chunk_draw(s, 10, (4, 5, 6, 7), 0.5).target for s in range(20)}) > 1


def test_replace_plan_equals_core_merge_with_zero_weights():
    torch.manual_seed(0)
    x = torch.randn(2, 40, 8)
    dst, src = torch.arange(10), torch.arange(10, 40)
    for align in (True, False):
        plan = replace_plan(x, dst, src, 20, align_batch=align)
        w = plan.replace_weights().expand(2, -1) if plan.rep.shape[0] == 1 else plan.replace_weights()
        y = merge(x, plan)  # gathers the representatives
        assert torch.equal(y, merge(x, plan, token_size=w))  # exact: replace = copy, not average
        assert torch.equal(unmerge(y, plan), y.gather(1, plan.group.expand(2, -1).unsqueeze(-1).expand(-1, -1, 8)))
        assert y.shape == (2, 20, 8)
        assert int(plan.size.sum()) == 40 * plan.batch


def test_align_batch_shares_one_map_with_best_over_samples():
    torch.manual_seed(1)
    x = torch.randn(2, 30, 6)
    dst, src = torch.arange(6), torch.arange(6, 30)
    shared = replace_plan(x, dst, src, 12, align_batch=True)
    per = replace_plan(x, dst, src, 12, align_batch=False)
    assert shared.rep.shape[0] == 1 and per.rep.shape[0] == 2
    # reference: each source's best destination over both samples
    m = torch.nn.functional.normalize(x, dim=-1)
    scores = torch.einsum("bsc,bdc->bsd", m[:, src], m[:, dst])  # (2, S, D)
    best = scores.amax(dim=(0, 2))
    merged = src[best.argsort(descending=True)[:12]]
    merged_mask = torch.isin(torch.arange(30), merged)
    grp = shared.group[0]
    assert torch.all(grp[merged_mask] < 6)  # merged sources point at destinations
    assert sorted(shared.rep[0, 6:].tolist()) == sorted(src[~torch.isin(src, merged)].tolist())


def test_local_merge_counts_and_target_values():
    torch.manual_seed(2)
    S, F, N, C = 2, 4, 16, 8
    joined = torch.randn(S, F * N, C)
    plan = local_plan(joined, F, target=2, ratio=0.9)
    r = int(0.9 * (F - 1) * N)
    assert plan.n_groups == F * N - r
    assert torch.equal(plan.rep[0, :N], torch.arange(2 * N, 3 * N))  # target frame = destinations
    y = merge(joined, plan)
    back = unmerge(y, plan)
    assert torch.equal(back[:, 2 * N : 3 * N], joined[:, 2 * N : 3 * N])  # target frame untouched
    # every token now holds the value of one token of the chunk (copy, never an average)
    flat = joined.reshape(S, -1, C)
    src_of = plan.rep[0][plan.group[0]]
    assert torch.equal(back, flat[:, src_of])


def test_global_plan_roles():
    torch.manual_seed(3)
    local, glob = torch.randn(2, 12, 4), torch.randn(2, 10, 4)
    p = global_plan(local, glob, 0.8, global_is_src=True)
    assert p.n_groups == 22 - int(0.8 * 10)
    assert torch.equal(p.rep[0, :12], torch.arange(12))  # local tokens are destinations
    q = global_plan(local, glob, 0.8, global_is_src=False)
    assert q.n_groups == 22 - int(0.8 * 12)
    assert torch.equal(q.rep[0, :10], torch.arange(12, 22))


def _opts(**kw):
    return VidToMeOptions.create(seed=0, **kw)


def test_no_merge_is_identity():
    torch.manual_seed(4)
    x = torch.randn(2 * 3, 16, 8)
    out, g = temporal_attention(x, 2, lambda t: t * 2, _opts(local_ratio=0.0, global_ratio=0.0), ChunkDraw(1, True), None)
    assert torch.equal(out, x * 2) and g is None


def test_attention_sees_merged_tokens_and_output_is_copied_back():
    torch.manual_seed(5)
    S, F, N, C = 2, 4, 16, 8
    x = torch.randn(S * F, N, C)
    seen = []

    def attn(t):
        seen.append(t.shape)
        return t + 1

    opts = _opts()
    out, g = temporal_attention(x, S, attn, opts, ChunkDraw(0, True), None)
    ml = F * N - int(0.9 * (F - 1) * N)
    assert seen == [(S, ml, C)] and g.shape == (S, ml, C)
    # the target frame (0) of every sample gets exactly its own attention output
    assert torch.equal(out.view(S, F, N, C)[:, 0], x.view(S, F, N, C)[:, 0] + 1)
    # second chunk: the global set joins as extra context, only the local part comes back
    x2 = torch.randn(S * 2, N, C)
    out2, g2 = temporal_attention(x2, S, attn, opts, ChunkDraw(1, True), g)
    ml2 = 2 * N - int(0.9 * N)
    assert seen[1] == (S, ml2 + ml - int(0.8 * ml), C)
    assert out2.shape == x2.shape and g2.shape == (S, ml2, C)


def test_options_validated():
    with pytest.raises(OptionError, match="chunk_size"):
        VidToMeOptions.create(chunk_size=0)
    with pytest.raises(OptionError, match="local_ratio"):
        VidToMeOptions.create(local_ratio=1.0)
    with pytest.raises(OptionError, match="max_downsample"):
        VidToMeOptions.create(max_downsample=3)
    with pytest.raises(OptionError, match="unknown"):
        VidToMeOptions.create(ratio=0.5)
    assert VidToMeOptions.create().seed is not None

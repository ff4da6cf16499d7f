"""Slow loop-based reference implementations (the specification the fast code must match)."""

import torch


def ref_partition(h, w, sx, sy, offsets):
    """offsets: dict (wy, wx) -> offset in [0, sx*sy), or None for top-left."""
    dst = []
    for wy in range(h // sy):
        for wx in range(w // sx):
            off = 0 if offsets is None else offsets[(wy, wx)]
            dst.append((wy * sy + off // sx) * w + wx * sx + off % sx)
    dst = sorted(dst)
    src = [i for i in range(h * w) if i not in set(dst)]
    return dst, src


def ref_match(metric, dst, src, r):
    """Per sample: list of (src token, dst token) merged pairs, and the kept src tokens."""
    out = []
    for b in range(metric.shape[0]):
        m = metric[b].double()
        m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        best = []
        for i in src:
            scores = [float(m[i] @ m[j]) for j in dst]
            j = max(range(len(dst)), key=lambda k: (scores[k], -k))
            best.append((scores[j], i, dst[j]))
        ranked = sorted(range(len(best)), key=lambda k: (-best[k][0], k))
        merged = [(best[k][1], best[k][2]) for k in ranked[:r]]
        kept = [best[k][1] for k in ranked[r:]]
        out.append((merged, kept))
    return out


def ref_merge_unmerge(x, dst, matches):
    """Merged-then-unmerged tokens: each token gets its group's mean. x: (B, N, C)."""
    y = x.clone().double()
    for b, (merged, _) in enumerate(matches):
        for d in dst:
            members = [d] + [s for s, t in merged if t == d]
            mean = x[b, members].double().mean(0)
            for t in members:
                y[b, t] = mean
    return y

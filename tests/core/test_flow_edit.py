"""core.flow_edit: FlowEdit against a direct transcription of the paper's Algorithm 1 (Kulikov et
al., arXiv 2412.08629) on toy velocity fields, SDEdit on a field it must integrate exactly, the
shifted schedules and the option errors. Float64, tiny tensors: milliseconds."""

import math

import pytest
import torch

from tomesd_ext.core.flow_edit import flow_sigmas, flowedit, resolution_mu, sdedit, shift_sigmas
from tomesd_ext.core.options import OptionError



@pytest.fixture(autouse=True)
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _fields(seed=0, dim=6):
    """Two different nonlinear velocity fields (source and target prompt) of (t, z)."""
    g = torch.Generator().manual_seed(seed)
    a_src, a_tar = torch.randn(dim, dim, generator=g) / 3, torch.randn(dim, dim, generator=g) / 3
    b_src, b_tar = torch.randn(dim, generator=g), torch.randn(dim, generator=g)

    def v_src(z, t):
        return torch.tanh(z @ a_src.T) + t * b_src

    def v_tar(z, t):
        return torch.sin(z @ a_tar.T) + (1 - t) * b_tar + z * t

    return v_src, v_tar


def _paper_flowedit(x_src, ts, v_src, v_tar, noises, n_max, n_min, n_avg):
    """Algorithm 1 as printed, with the paper's indexing: t_0 = 0 < t_1 < ... < t_T = 1,
    i runs from n_max down to 1; Z_FE starts at X_src; the last n_min steps are plain sampling
    from Z_FE noised to t_{n_min} (noises is the list of N draws, consumed in order)."""
    T = len(ts) - 1
    noises = iter(noises)
    z_fe = x_src.clone()
    for i in range(n_max, n_min, -1):
        v_delta = torch.zeros_like(x_src)
        for _ in range(n_avg):
            n_i = next(noises)
            z_src_t = (1 - ts[i]) * x_src + ts[i] * n_i
            z_tar_t = z_fe + z_src_t - x_src
            v_delta = v_delta + (v_tar(z_tar_t, ts[i]) - v_src(z_src_t, ts[i])) / n_avg
        z_fe = z_fe + (ts[i - 1] - ts[i]) * v_delta
    if n_min == 0:
        return z_fe
    n = next(noises)
    z_tar = z_fe + ((1 - ts[n_min]) * x_src + ts[n_min] * n) - x_src
    for i in range(n_min, 0, -1):
        z_tar = z_tar + (ts[i - 1] - ts[i]) * v_tar(z_tar, ts[i])
    assert T >= n_max
    return z_tar


@pytest.mark.parametrize("steps, n_max, n_min, n_avg", [(10, 7, 0, 1), (10, 10, 0, 3), (12, 8, 3, 2), (5, 1, 0, 1)])
def test_flowedit_matches_the_papers_algorithm(steps, n_max, n_min, n_avg):
    v_src, v_tar = _fields()
    x_src = torch.randn(4, 6, generator=torch.Generator().manual_seed(5))
    sigmas = flow_sigmas(steps, shift=3.0)  # decreasing: sigmas[k] = t_{T - k}
    ts = sigmas.flip(0).tolist()
    draws = n_avg * (n_max - n_min) + (n_min > 0)
    noises = [torch.randn(4, 6, generator=torch.Generator().manual_seed(100 + k)) for k in range(draws)]
    it = iter(noises)
    ours = flowedit(x_src, sigmas, v_src, v_tar, lambda: next(it), n_max, n_min, n_avg)
    paper = _paper_flowedit(x_src, ts, v_src, v_tar, noises, n_max, n_min, n_avg)
    assert torch.allclose(ours, paper, rtol=0, atol=1e-12)
    assert not torch.allclose(ours, x_src, atol=1e-3)  # it edits


def test_flowedit_with_equal_prompts_returns_the_source():
    v_src, _ = _fields()
    x_src = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    out = flowedit(x_src, flow_sigmas(8), v_src, v_src, lambda: torch.randn(3, 6, generator=g), 6, 0, 2)
    assert torch.allclose(out, x_src, rtol=0, atol=1e-12)  # (z + z_src) - x_src is z_src up to rounding


@pytest.mark.parametrize("strength", [0.3, 0.6, 1.0])
def test_sdedit_integrates_a_point_mass_flow_exactly(strength):
    """Data at one point x*: v(x, s) = (x - x*) / s, which Euler steps follow exactly to x*."""
    target = torch.tensor([1.5, -2.0, 0.25])
    x0 = torch.tensor([0.3, 0.1, -0.7])
    noise = torch.randn(3, generator=torch.Generator().manual_seed(0))
    calls = []

    def v(x, s):
        calls.append(s)
        return (x - target) / s

    out = sdedit(x0, flow_sigmas(10, shift=3.0), strength, noise, v)
    assert torch.allclose(out, target, atol=1e-12)
    assert len(calls) == round(10 * strength)


def test_schedules():
    s = flow_sigmas(4)
    assert s.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    shifted = flow_sigmas(4, shift=3.0)
    assert shifted[0] == 1 and shifted[-1] == 0 and torch.all(shifted[1:-1] > s[1:-1])
    assert math.isclose(float(shifted[2]), 3 * 0.5 / (1 + 2 * 0.5))
    mu = resolution_mu(2560, 1024, 4096, 0.95, 2.05)
    assert math.isclose(mu, 0.95 + 1.1 * 1536 / 3072)
    u = torch.tensor([1.0, 0.5, 0.0])
    assert torch.allclose(shift_sigmas(u, mu=mu), torch.tensor([1.0, math.exp(mu) / (math.exp(mu) + 1), 0.0]))


@pytest.mark.parametrize("kwargs, message", [
    ({"n_max": 9}, "n_max=9 is out of range: allowed [1, 8]"),
    ({"n_max": 4, "n_min": 4}, "n_min=4 is out of range: allowed [0, 3]"),
    ({"n_max": 4, "n_avg": 0}, "n_avg=0 is out of range"),
])
def test_flowedit_option_errors_name_the_value(kwargs, message):
    x = torch.zeros(2)
    with pytest.raises(OptionError, match=message.replace("[", r"\[").replace("]", r"\]")):
        flowedit(x, flow_sigmas(8), lambda z, t: z, lambda z, t: z, lambda: x, **kwargs)


def test_sdedit_strength_error():
    with pytest.raises(OptionError, match="strength=0 is out of range"):
        sdedit(torch.zeros(2), flow_sigmas(4), 0, torch.zeros(2), lambda z, t: z)

"""Soundness, exactness and tightness of gamma.bounds.relax.

Every bound is checked against an independent float64 reference (numpy /
scipy, stable formulas) on a dense grid of each interval and against a PGD
attack.  Comparisons are exact float64 comparisons: any slack must be inside
the bound.
"""

from __future__ import annotations

import math

import mpmath as mp
import numpy as np
import pytest
import scipy.special as sp
import torch

from gamma.bounds import relax
from gamma.errors import GammaError, UnsupportedOp

FNS = sorted(relax.FUNCTIONS)
POSITIVE = {"reciprocal", "rsqrt"}          # x > 0
NONNEG = {"sqrt"}                           # x >= 0
K_TANH = math.sqrt(2 / math.pi)
SEED = 1234


# ---------------------------------------------------------------- references
def ref_np(fn: str, x: np.ndarray) -> np.ndarray:
    """Independent float64 reference of f (stable forms)."""
    if fn == "gelu":
        return 0.5 * x * sp.erfc(-x / np.sqrt(2.0))
    if fn == "gelu_tanh":
        return x * sp.expit(2 * K_TANH * (x + 0.044715 * x ** 3))
    if fn == "silu":
        return x * sp.expit(x)
    if fn == "exp":
        return np.exp(x)
    if fn == "reciprocal":
        return 1.0 / x
    if fn == "rsqrt":
        return 1.0 / np.sqrt(x)
    if fn == "sqrt":
        return np.sqrt(x)
    if fn == "square":
        return x * x
    if fn == "sigmoid":
        return sp.expit(x)
    if fn == "tanh":
        return np.tanh(x)
    raise KeyError(fn)


def ref_torch(fn: str, x: torch.Tensor) -> torch.Tensor:
    """Differentiable torch float64 version of f, for the attack only."""
    if fn == "gelu":
        return 0.5 * x * torch.special.erfc(-x / math.sqrt(2.0))
    if fn == "gelu_tanh":
        return x * torch.sigmoid(2 * K_TANH * (x + 0.044715 * x ** 3))
    if fn == "silu":
        return x * torch.sigmoid(x)
    return {"exp": torch.exp, "reciprocal": torch.reciprocal, "rsqrt": torch.rsqrt,
            "sqrt": lambda t: torch.sqrt(t.clamp_min(0)), "square": lambda t: t * t,
            "sigmoid": torch.sigmoid, "tanh": torch.tanh}[fn](x)


# ---------------------------------------------------------------- samplers
def sample_intervals(fn: str, n: int, rng: np.random.Generator):
    """(l, u, kind) float64 arrays mixing narrow, wide, straddling, large, degenerate."""
    kinds, ls, us = [], [], []

    def add(kind, l, u):
        kinds.extend([kind] * len(l))
        ls.append(l)
        us.append(u)

    m = n // 6
    if fn in POSITIVE or fn in NONNEG:
        c = 10 ** rng.uniform(-4, 1.5, m)
        w = 10 ** rng.uniform(-8, -3, m)
        add("narrow", c, c + w)
        c = 10 ** rng.uniform(-3, 1, m)
        add("wide", c, c + rng.uniform(0, 20, m))
        c = 10 ** rng.uniform(-9, -2, m)                     # near the domain edge
        add("edge", c if fn in POSITIVE else np.where(rng.random(m) < 0.3, 0.0, c),
            c + 10 ** rng.uniform(-6, 1, m))
        c = 10 ** rng.uniform(1, 4, m)
        add("large", c, c + c * 10 ** rng.uniform(-12, 0, m))
        c = 10 ** rng.uniform(-6, 4, m)
        add("degenerate", c, c.copy())
        c = 10 ** rng.uniform(-3, 3, m)
        add("tiny", c, c + c * 10 ** rng.uniform(-13, -9, m))
    else:
        hi_mag = 700.0 if fn == "exp" else 1e3
        c = rng.uniform(-8, 8, m)
        add("narrow", c, c + 10 ** rng.uniform(-8, -3, m))
        c = rng.uniform(-15, 5, m)
        add("wide", c, c + rng.uniform(0, 20, m))
        add("straddle", -rng.uniform(0, 10, m), rng.uniform(0, 10, m))
        c = rng.uniform(-hi_mag, hi_mag, m)
        w = 10 ** rng.uniform(-9, 1, m)
        add("large", c, np.minimum(c + w, 709.0) if fn == "exp" else c + w)
        c = np.concatenate([rng.uniform(-8, 8, m // 2), rng.uniform(-hi_mag, hi_mag, m - m // 2)])
        add("degenerate", c, c.copy())
        if fn == "exp":
            c = rng.uniform(-700, 700, m)
        else:
            c = rng.choice([-1.0, 1.0], m) * 10 ** rng.uniform(-6, 4, m)
        add("tiny", c, c + np.abs(c) * 10 ** rng.uniform(-13, -9, m) + 1e-300)
    return np.concatenate(ls), np.concatenate(us), np.array(kinds)


def grid(l: np.ndarray, u: np.ndarray, k: int = 1001) -> np.ndarray:
    t = np.linspace(0.0, 1.0, k)
    x = l[:, None] + (u - l)[:, None] * t[None, :]
    x = np.minimum(np.maximum(x, l[:, None]), u[:, None])
    x[:, 0], x[:, -1] = l, u
    return x


def attack(fn: str, l: np.ndarray, u: np.ndarray, a: np.ndarray, b: np.ndarray,
           upper: bool, restarts: int = 3, steps: int = 40) -> np.ndarray:
    """PGD points in [l, u] maximising f - (a x + b) (upper) or (a x + b) - f."""
    gen = torch.Generator().manual_seed(SEED)
    lt, ut = torch.tensor(l), torch.tensor(u)
    at, bt = torch.tensor(a), torch.tensor(b)
    w = ut - lt
    pts = []
    for r in range(restarts):
        t = torch.rand(len(l), generator=gen, dtype=torch.float64)
        x = (lt + t * w).clamp(lt, ut).requires_grad_(True)
        for s in range(steps):
            fx = ref_torch(fn, x)
            obj = fx - (at * x + bt) if upper else (at * x + bt) - fx
            (g,) = torch.autograd.grad(obj.sum(), x)
            with torch.no_grad():
                step = 0.25 * w * (1 - s / steps) ** 2
                x = torch.minimum(torch.maximum(x + step * torch.sign(g), lt), ut)
            x.requires_grad_(True)
        pts.append(x.detach().numpy())
    return np.stack(pts, 1)


def violations(fn, x, al, bl, au, bu):
    fx = ref_np(fn, x)
    low = al[:, None] * x + bl[:, None]
    up = au[:, None] * x + bu[:, None]
    bad_l = ~(low <= fx)
    bad_u = ~(fx <= up)
    return bad_l, bad_u


def _alpha(mode, n, rng):
    if mode is None:
        return None
    if mode == "one":
        return torch.tensor(rng.uniform(0, 1, n))
    return (torch.tensor(rng.uniform(0, 1, n)), torch.tensor(rng.uniform(0, 1, n)))


# ---------------------------------------------------------------- soundness
@pytest.mark.parametrize("fn", FNS)
@pytest.mark.parametrize("mode", [None, "one", "pair"])
def test_linear_sound_grid_and_attack(fn, mode):
    rng = np.random.default_rng(SEED + FNS.index(fn) * 7 + (0 if mode is None else len(mode)))
    l, u, kinds = sample_intervals(fn, 360, rng)
    alpha = _alpha(mode, len(l), rng)
    al, bl, au, bu = (t.numpy() for t in relax.linear(fn, torch.tensor(l), torch.tensor(u), alpha))
    assert all(np.isfinite(t).all() for t in (al, au)), "slopes must be finite"
    for x in (grid(l, u), attack(fn, l, u, au, bu, True), attack(fn, l, u, al, bl, False)):
        bad_l, bad_u = violations(fn, x, al, bl, au, bu)
        i = np.nonzero(bad_l.any(1) | bad_u.any(1))[0]
        assert i.size == 0, (f"{fn} alpha={mode}: {i.size} unsound intervals, e.g. "
                             f"[{l[i[0]]!r}, {u[i[0]]!r}] kind {kinds[i[0]]}")


@pytest.mark.parametrize("fn", FNS)
def test_interval_sound_grid_and_attack(fn):
    rng = np.random.default_rng(SEED + 100 + FNS.index(fn))
    l, u, kinds = sample_intervals(fn, 600, rng)
    lo, hi = (t.numpy() for t in relax.interval(fn, torch.tensor(l), torch.tensor(u)))
    zero = np.zeros_like(l)
    for x in (grid(l, u), attack(fn, l, u, zero, hi, True), attack(fn, l, u, zero, lo, False)):
        fx = ref_np(fn, x)
        bad = ~((lo[:, None] <= fx) & (fx <= hi[:, None]))
        i = np.nonzero(bad.any(1))[0]
        assert i.size == 0, f"{fn}: interval unsound on [{l[i[0]]!r}, {u[i[0]]!r}] ({kinds[i[0]]})"


@pytest.mark.parametrize("fn", FNS)
def test_alpha_extremes_and_out_of_range_are_sound(fn):
    rng = np.random.default_rng(SEED + 200 + FNS.index(fn))
    l, u, _ = sample_intervals(fn, 120, rng)
    x = grid(l, u, 401)
    for a in (0.0, 1.0, -3.0, 7.0):
        alpha = (torch.full((len(l),), a, dtype=torch.float64), torch.full((len(l),), 1.0 - a, dtype=torch.float64))
        al, bl, au, bu = (t.numpy() for t in relax.linear(fn, torch.tensor(l), torch.tensor(u), alpha))
        bad_l, bad_u = violations(fn, x, al, bl, au, bu)
        assert not bad_l.any() and not bad_u.any(), f"{fn} alpha={a}"


@pytest.mark.parametrize("fn", ["gelu", "silu", "sigmoid", "tanh", "gelu_tanh", "exp", "square"])
def test_huge_magnitudes(fn):
    if fn == "exp":
        l = np.array([-1e4, -745.0, -800.0, 700.0, 709.0])
        u = np.array([-1e4 + 1.0, -700.0, 709.0, 709.5, 709.7])
    else:
        l = np.array([-1e4, -1e4, 1e4 - 1e-9, -5e3, 9e3, -1e4])
        u = np.array([-1e4 + 1e-9, 1e4, 1e4, -4e3, 1e4, -1e4])
    al, bl, au, bu = (t.numpy() for t in relax.linear(fn, torch.tensor(l), torch.tensor(u)))
    bad_l, bad_u = violations(fn, grid(l, u, 2001), al, bl, au, bu)
    assert not bad_l.any() and not bad_u.any()
    lo, hi = (t.numpy() for t in relax.interval(fn, torch.tensor(l), torch.tensor(u)))
    fx = ref_np(fn, grid(l, u, 2001))
    assert (lo[:, None] <= fx).all() and (fx <= hi[:, None]).all()


def test_exp_overflow_falls_back_to_interval():
    al, bl, au, bu = relax.linear("exp", torch.tensor([700.0]), torch.tensor([800.0]))
    assert au.item() == 0 and bu.item() == math.inf
    assert math.isfinite(al.item()) and math.isfinite(bl.item())


def test_shapes_and_broadcasting():
    l = torch.zeros(2, 3, dtype=torch.float64) - 1
    u = torch.ones(3, dtype=torch.float64)
    out = relax.linear("gelu", l, u)
    assert all(t.shape == (2, 3) and t.dtype == torch.float64 for t in out)
    alpha = torch.rand(4, 2, 3, dtype=torch.float64)
    out = relax.linear("silu", l, u, alpha)
    assert all(t.shape == (4, 2, 3) for t in out)
    lo, hi = relax.interval("tanh", torch.tensor(0.5), torch.tensor(0.5))
    assert lo.shape == () and lo <= math.tanh(0.5) <= hi
    out = relax.linear("exp", torch.zeros(0), torch.zeros(0))
    assert all(t.numel() == 0 for t in out)


def test_offsets_any_slope_is_sound():
    rng = np.random.default_rng(SEED + 300)
    for fn in FNS:
        l, u, _ = sample_intervals(fn, 120, rng)
        a_l = rng.normal(0, 2, len(l))
        a_u = rng.normal(0, 2, len(l))
        bl, bu = (t.numpy() for t in relax.offsets(fn, torch.tensor(l), torch.tensor(u),
                                                     torch.tensor(a_l), torch.tensor(a_u)))
        bad_l, bad_u = violations(fn, grid(l, u, 501), a_l, bl, a_u, bu)
        assert not bad_l.any() and not bad_u.any(), fn


# ---------------------------------------------------------------- exact cases
def test_exact_exp_on_0_1():
    al, bl, au, bu = (t.item() for t in relax.linear("exp", torch.tensor([0.0]), torch.tensor([1.0])))
    e = math.e
    assert au == pytest.approx(e - 1, rel=1e-15) and bu >= 1.0 and bu == pytest.approx(1.0, abs=1e-13)
    assert al == pytest.approx(math.exp(0.5), rel=1e-15)               # tangent at the midpoint
    assert bl <= 0.5 * math.exp(0.5) and bl == pytest.approx(0.5 * math.exp(0.5), rel=1e-13)


def test_exact_square_interval():
    lo, hi = relax.interval("square", torch.tensor([-1.0]), torch.tensor([2.0]))
    assert lo.item() == 0.0
    assert hi.item() >= 4.0 and hi.item() == pytest.approx(4.0, rel=1e-13)
    lo, hi = relax.interval("square", torch.tensor([1.0]), torch.tensor([3.0]))
    assert lo.item() <= 1.0 and lo.item() == pytest.approx(1.0, rel=1e-13)


def test_exact_reciprocal_chord():
    al, bl, au, bu = (t.item() for t in relax.linear("reciprocal", torch.tensor([1.0]), torch.tensor([2.0])))
    assert au == pytest.approx(-0.5, rel=1e-15) and bu >= 1.5 and bu == pytest.approx(1.5, rel=1e-13)
    assert al == pytest.approx(-1 / 2.25, rel=1e-15) and bl <= 2 / 1.5
    assert bl == pytest.approx(2 / 1.5, rel=1e-13)


def test_exact_sqrt_and_tanh():
    al, bl, au, bu = (t.item() for t in relax.linear("sqrt", torch.tensor([0.0]), torch.tensor([4.0])))
    assert al == pytest.approx(0.5) and bl <= 0 and bl == pytest.approx(0, abs=1e-13)
    assert au == pytest.approx(0.5 / math.sqrt(2)) and bu == pytest.approx(math.sqrt(2) / 2, rel=1e-13)
    # tanh on [-1, 1]: odd, so with the chord slope the two offsets are opposite
    al, bl, au, bu = (t.item() for t in relax.linear("tanh", torch.tensor([-1.0]), torch.tensor([1.0])))
    assert al == au == pytest.approx(math.tanh(1.0))
    assert bu == pytest.approx(-bl, rel=1e-12) and bu > 0


def test_exact_gelu_interval_contains_minimum():
    lo, hi = relax.interval("gelu", torch.tensor([-1.0, 0.0]), torch.tensor([1.0, 1.0]))
    assert lo[0].item() == relax.FUNCTIONS["gelu"].fmin_lo
    assert hi[0].item() == pytest.approx(0.5 * (1 + math.erf(1 / math.sqrt(2))), rel=1e-13)
    assert -1e-15 <= lo[1].item() <= 0


def test_degenerate_is_constant():
    for fn in FNS:
        x = torch.tensor([0.7, 3.0], dtype=torch.float64)
        al, bl, au, bu = relax.linear(fn, x, x)
        assert (al == 0).all() and (au == 0).all()
        f = torch.tensor(ref_np(fn, x.numpy()))
        assert (bl <= f).all() and (f <= bu).all()
        assert ((bu - bl) <= 1e-13 * (1 + f.abs())).all()


# ---------------------------------------------------------------- tightness
@pytest.mark.parametrize("fn", ["gelu", "gelu_tanh", "silu", "sigmoid", "tanh", "exp", "square"])
def test_tight_on_narrow_intervals(fn):
    c = torch.linspace(-6, 6, 241, dtype=torch.float64)
    for w in (1e-3, 1e-5):
        al, bl, au, bu = relax.linear(fn, c - w / 2, c + w / 2)
        gap = (au - al) * c + bu - bl
        limit = 1e-6 if w == 1e-3 else 1e-9
        if fn == "exp":
            limit *= math.exp(6)
        assert gap.max().item() < limit, (fn, w, gap.max().item())


@pytest.mark.parametrize("fn", FNS)
def test_offsets_close_to_true_extremes(fn):
    """bu / bl are within a hair of the grid extremes of f - a x (no hidden looseness)."""
    rng = np.random.default_rng(SEED + 400 + FNS.index(fn))
    l, u, _ = sample_intervals(fn, 240, rng)
    keep = (u - l <= 1.0) & (np.maximum(abs(l), abs(u)) <= 50)
    l, u = l[keep], u[keep]
    al, bl, au, bu = (t.numpy() for t in relax.linear(fn, torch.tensor(l), torch.tensor(u)))
    x = grid(l, u, 2001)
    fx = ref_np(fn, x)
    top = (fx - au[:, None] * x).max(1)
    bot = (fx - al[:, None] * x).min(1)
    scale = 1 + np.abs(fx).max(1)
    assert (bu - top <= 1e-6 * scale).all()
    assert (bot - bl <= 1e-6 * scale).all()


def test_alpha_tangent_is_tight_for_convex_functions():
    # tangent lower bound of exp at t: bl = f(t) - f'(t) t up to rounding margin
    l, u = torch.tensor([-1.0]), torch.tensor([2.0])
    for a in (0.0, 0.25, 1.0):
        al, bl, _, _ = relax.linear("exp", l, u, torch.tensor([a]))
        t = -1.0 + 3.0 * a
        assert al.item() == pytest.approx(math.exp(t), rel=1e-15)
        assert bl.item() <= math.exp(t) * (1 - t)
        assert bl.item() == pytest.approx(math.exp(t) * (1 - t), abs=1e-12)


# ---------------------------------------------------------------- alpha gradient
@pytest.mark.parametrize("fn", ["gelu", "silu", "exp", "sqrt", "sigmoid"])
def test_alpha_gradient(fn):
    lo = 0.5 if fn == "sqrt" else -2.0
    l = torch.tensor([lo, lo + 0.5, lo + 1.0], dtype=torch.float64)
    u = l + torch.tensor([3.0, 1.0, 0.5], dtype=torch.float64)
    a_l = torch.tensor([0.2, 0.5, 0.7], dtype=torch.float64, requires_grad=True)
    a_u = torch.tensor([0.3, 0.6, 0.9], dtype=torch.float64, requires_grad=True)
    m = (l + u) / 2

    def objective(al_, au_):
        al, bl, au, bu = relax.linear(fn, l, u, (al_, au_))
        return ((au * m + bu) - (al * m + bl)).sum()

    obj = objective(a_l, a_u)
    obj.backward()
    # convex / concave functions ignore the alpha of their chord side
    gl = a_l.grad if a_l.grad is not None else torch.zeros(3, dtype=torch.float64)
    gu = a_u.grad if a_u.grad is not None else torch.zeros(3, dtype=torch.float64)
    assert torch.isfinite(gl).all() and torch.isfinite(gu).all()
    assert (gl.abs() + gu.abs()).sum() > 0
    h = 1e-6
    with torch.no_grad():
        for a, g in ((a_l, gl), (a_u, gu)):
            for i in range(3):
                e = torch.zeros(3, dtype=torch.float64)
                e[i] = h
                args_p = (a_l + e, a_u) if a is a_l else (a_l, a_u + e)
                args_m = (a_l - e, a_u) if a is a_l else (a_l, a_u - e)
                fd = (objective(*args_p) - objective(*args_m)) / (2 * h)
                assert g[i].item() == pytest.approx(fd.item(), rel=1e-4, abs=1e-7), (fn, i)


# ---------------------------------------------------------------- errors
def test_domain_errors():
    with pytest.raises(GammaError, match="reciprocal is defined only for x > 0"):
        relax.linear("reciprocal", torch.tensor([0.0]), torch.tensor([1.0]))
    with pytest.raises(GammaError, match="rsqrt"):
        relax.interval("rsqrt", torch.tensor([-1.0]), torch.tensor([1.0]))
    with pytest.raises(GammaError, match="sqrt is defined only for x >= 0"):
        relax.interval("sqrt", torch.tensor([-1e-9]), torch.tensor([1.0]))
    relax.interval("sqrt", torch.tensor([0.0]), torch.tensor([1.0]))   # closed domain
    with pytest.raises(GammaError, match="lower bound above upper bound"):
        relax.linear("gelu", torch.tensor([1.0]), torch.tensor([0.0]))
    with pytest.raises(GammaError, match="NaN"):
        relax.interval("tanh", torch.tensor([math.nan]), torch.tensor([0.0]))
    with pytest.raises(UnsupportedOp, match="'softplus'"):
        relax.linear("softplus", torch.tensor([0.0]), torch.tensor([1.0]))


# ---------------------------------------------------------------- facts as data
def _mp_d2(fn, x):
    s = lambda w: 1 / (1 + mp.exp(-w))
    if fn == "gelu":
        return mp.exp(-x * x / 2) / mp.sqrt(2 * mp.pi) * (2 - x * x)
    if fn == "silu":
        return s(x) * (1 - s(x)) * (2 + x * (1 - 2 * s(x)))
    k, c = mp.sqrt(2 / mp.pi), mp.mpf("0.044715")
    w, w1, w2 = 2 * k * (x + c * x ** 3), 2 * k * (1 + 3 * c * x * x), 12 * k * c * x
    s1 = s(w) * (1 - s(w))
    return 2 * s1 * w1 + x * s1 * (1 - 2 * s(w)) * w1 ** 2 + x * s1 * w2


def _mp_f(fn, x):
    if fn == "gelu":
        return x / 2 * mp.erfc(-x / mp.sqrt(2))
    if fn == "silu":
        return x / (1 + mp.exp(-x))
    if fn == "gelu_tanh":
        return x / 2 * (1 + mp.tanh(mp.sqrt(2 / mp.pi) * (x + mp.mpf("0.044715") * x ** 3)))
    return {"exp": mp.exp, "reciprocal": lambda t: 1 / t, "rsqrt": lambda t: 1 / mp.sqrt(t),
            "sqrt": mp.sqrt, "square": lambda t: t * t, "sigmoid": lambda t: 1 / (1 + mp.exp(-t)),
            "tanh": mp.tanh}[fn](x)


@pytest.mark.parametrize("fn", ["gelu", "gelu_tanh", "silu"])
def test_inflection_points_and_minimum(fn):
    mp.mp.dps = 40
    spec = relax.FUNCTIONS[fn]
    for start, end, s in spec.pieces:
        for b in (start, end):
            if math.isinf(b):
                continue
            # the true inflection point is within delta of the stored one
            below, above = _mp_d2(fn, mp.mpf(b) - spec.delta), _mp_d2(fn, mp.mpf(b) + spec.delta)
            assert below * above < 0, (fn, b)
    # minimum: stored lower bound is below the true minimum, argmin within tol
    xm = mp.findroot(lambda x: mp.diff(lambda t: _mp_f(fn, t), x), spec.argmin)
    assert abs(float(xm) - spec.argmin) <= spec.argmin_tol
    assert mp.mpf(spec.fmin_lo) <= _mp_f(fn, xm)
    assert _mp_f(fn, xm) - mp.mpf(spec.fmin_lo) < 1e-15


@pytest.mark.parametrize("fn", FNS)
def test_curvature_pattern_matches_data(fn):
    """f'' has the sign recorded in ``pieces`` away from the boundaries."""
    spec = relax.FUNCTIONS[fn]
    x = np.concatenate([np.linspace(-60, 60, 120001), -np.logspace(-8, 3, 2000), np.logspace(-8, 3, 2000)])
    if fn in POSITIVE or fn in NONNEG:
        x = x[x > 1e-8]
    xt = torch.tensor(x)
    d2 = spec.d2f(xt).numpy()
    for start, end, s in spec.pieces:
        inside = (x > start + 1e-6) & (x < end - 1e-6)
        assert (s * d2[inside] >= 0).all(), (fn, start, end)
    if spec.monotone:
        d1 = spec.df(xt).numpy()
        assert (spec.monotone * d1 >= 0).all()
    else:     # unimodal: f' <= 0 left of argmin, >= 0 right of it
        d1 = spec.df(xt).numpy()
        assert (d1[x < spec.argmin - 1e-6] <= 0).all() and (d1[x > spec.argmin + 1e-6] >= 0).all()


@pytest.mark.parametrize("fn", FNS)
def test_float64_accuracy_model(fn):
    """spec.f / spec.df are within EPS*(rel64*|f| + abs64) of the exact values."""
    mp.mp.dps = 40
    spec = relax.FUNCTIONS[fn]
    rng = np.random.default_rng(SEED + 500)
    x = np.concatenate([rng.uniform(-40, 40, 150), np.sign(rng.uniform(-1, 1, 150)) * 10 ** rng.uniform(-8, 3, 150)])
    if fn in POSITIVE or fn in NONNEG:
        x = np.abs(x) + 1e-12
    if fn == "exp":
        x = x[x < 700]
    xt = torch.tensor(x)
    f64, d64 = spec.f(xt).numpy(), spec.df(xt).numpy()
    for xi, fi, di in zip(x, f64, d64):
        xm = mp.mpf(float(xi))
        fe = _mp_f(fn, xm)
        de = mp.diff(lambda t: _mp_f(fn, t), xm)
        assert abs(mp.mpf(float(fi)) - fe) <= relax.EPS * (spec.rel64 * abs(fe) + spec.abs64) + relax.TINY, (fn, xi)
        assert abs(mp.mpf(float(di)) - de) <= relax.EPS * (spec.drel64 * abs(de) + spec.dabs64) + relax.TINY, (fn, xi)

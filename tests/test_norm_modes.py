"""Row-shared float32 errors of LayerNorm / RMSNorm (gamma.bounds.fpmargin.CommonModes):
the norm computes its mean and its inverse scale once per row, so their rounding is one
error per row, which CROWN charges through the row's signed sum.  Hand cases for the
charge, the split against the elementwise margin, and float32 engines that compute the
norm in several orders and variance formulas against the bounds (samples + PGD)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gamma.bounds import Tunings, compute_bounds, fpmargin, fpprob
from gamma.bounds.interval import Interval
from gamma.bounds.rows import Dense, Rows
from gamma.graph import Graph
from soundness import f32_sum, graph_fn, violations


def test_shared_error_is_charged_through_the_signed_row_sum_by_hand():
    # one cotangent row over a node (2 tokens, 2 units); s = 0.5 on token 0, 0.25 on token 1
    v = torch.tensor([[2.0, 2.0], [1.0, 3.0]], dtype=torch.float64)
    s = torch.tensor([[0.5], [0.25]], dtype=torch.float64)
    t = torch.tensor([[[1.0, -1.0], [1.0, 1.0]]], dtype=torch.float64)       # (S=1, T=2, d=2)
    # token 0: 0.5 |2 - 2| = 0; token 1: 0.25 |1 + 3| = 1
    assert Dense(t).shared_abs_dot(v, s).tolist() == [1.0]
    # against the elementwise charge |t| . (s |v|) = 0.5 * 4 + 0.25 * 4 = 3
    assert Dense(t).abs_dot(s * v.abs()).tolist() == [3.0]
    # the token-compact layout: row 0 at token 1 with [1, 1], row 1 at token 0 with [1, -1]
    r = Rows(torch.tensor([[[1.0, 1.0]], [[1.0, -1.0]]], dtype=torch.float64), torch.tensor([1, 0]), 2)
    assert r.shared_abs_dot(v, s).tolist() == [1.0, 0.0]


def _ln_box(seed: int, d: int = 16, offset: float = 0.0, centered: bool = True):
    gen = torch.Generator().manual_seed(seed)
    g = Graph("n", "x", (3, d))
    op = "layernorm" if centered else "rmsnorm"
    params = dict(weight=torch.randn(d, generator=gen).float().double(), eps=1e-5)
    if centered:
        params["bias"] = torch.randn(d, generator=gen).float().double()
    g.add("y", op, "x", **params)
    g.infer_shapes()
    c = torch.randn(3, d, generator=gen, dtype=torch.float64) + offset
    x = Interval(c - 1e-3, c + 1e-3)
    out = compute_bounds(g, c, 1e-3, "ibp", arithmetic="real").nodes["y"]
    return g, x, out


@pytest.mark.parametrize("centered", [True, False])
def test_split_adds_up_to_the_elementwise_margin(centered):
    """elem + sum_k s_k |v_k| is the hedged elementwise margin the IBP boxes are widened by,
    and the shared parts are where the bulk of it is (the variance's and mean's sums)."""
    g, x, out = _ln_box(4, d=64, offset=30.0, centered=centered)
    parts = fpmargin.norm_modes(g["y"], [x], out)
    m = fpmargin.margin(g["y"], [x], out)
    assert torch.allclose(parts.total(), m, rtol=1e-12, atol=0)
    assert len(parts.modes) == (2 if centered else 1)
    assert (parts.elem < 0.2 * m).all()


@pytest.mark.parametrize("two_pass", [True, False])
def test_each_shared_error_within_its_bound_for_a_float32_layernorm(two_pass):
    """The split term by term, against a float32 LayerNorm whose internals are visible: its
    scale's relative error t = r'/r - 1 within s_A, its mean's error times r within s_B, and
    what is left of fl(y) - y after t w n - e r w within elem, element by element (a row mean of
    30: the mean's and the variance's rounding are far above the per-element rounding)."""
    g, x, out = _ln_box(9, d=64, offset=30.0, centered=True)
    parts = fpmargin.norm_modes(g["y"], [x], out)
    (vcA, vrA, sA), (_, _, sB) = parts.modes
    p = g["y"].params
    w, b = p["weight"], p["bias"]
    pts = [(x.center + f * x.radius).float().double() for f in (0.0, -0.9, 0.9)]
    for xs in pts:
        assert (xs >= x.lower).all() and (xs <= x.upper).all()
        x32 = xs.float().numpy()
        mu = xs.mean(-1, keepdim=True)
        r = ((xs - mu) ** 2).mean(-1, keepdim=True).add(p["eps"]).rsqrt()
        n = (xs - mu) * r
        y = w * n + b
        mu32 = np.float32(0) + np.zeros((x32.shape[0], 1), dtype=np.float32)
        for i in range(x32.shape[1]):
            mu32 = (mu32 + x32[:, i:i + 1]).astype(np.float32)
        mu32 = (mu32 / np.float32(x32.shape[1])).astype(np.float32)
        c32 = (x32 - mu32).astype(np.float32)
        if two_pass:
            var32 = (c32 * c32).astype(np.float32).mean(-1, keepdims=True, dtype=np.float32)
        else:
            var32 = ((x32 * x32).astype(np.float32).mean(-1, keepdims=True, dtype=np.float32) - mu32 * mu32)
        r32 = (np.float32(1) / np.sqrt((var32 + np.float32(p["eps"])).astype(np.float32))).astype(np.float32)
        y32 = (w.float().numpy() * (c32 * r32).astype(np.float32) + b.float().numpy()).astype(np.float32)
        t = torch.from_numpy(r32).double() / r - 1
        e = torch.from_numpy(mu32).double() - mu
        assert (t.abs() <= sA).all() and ((e * r).abs() <= sB).all()
        rest = torch.from_numpy(y32).double() - y - t * w * n + e * r * w
        assert (rest.abs() <= parts.elem).all()
        assert ((w * n - vcA).abs() <= vrA * (1 + 1e-12) + 1e-15).all()


def _ln_then_cancel(d: int = 32, offset: float = 200.0):
    """x (2, d) -> LayerNorm -> linear whose rows are orthogonal to the norm's weight and
    to nothing else: the mean's rounding (shared, times w) cancels in every output."""
    gen = torch.Generator().manual_seed(31)
    g = Graph("cancel", "x", (2, d))
    w = (torch.rand(d, generator=gen) + 0.5).float().double()
    g.add("n", "layernorm", "x", weight=w, bias=torch.zeros(d, dtype=torch.float64), eps=1e-5)
    a = torch.randn(4, d, generator=gen, dtype=torch.float64)
    a = a - (a @ w)[:, None] * w[None, :] / (w @ w)                              # a_k . w = 0
    g.add("y", "linear", "n", weight=a.float().double())
    g.infer_shapes()
    x0 = (torch.randn(2, d, generator=gen, dtype=torch.float64) + offset).float().double()
    return g, x0


def _float32_engines(g, order_seed: int):
    """float32 LayerNorm + linear computed as an engine might: the mean and the variance
    summed in a random order, given order and reversed, by two-pass or E[x^2] - E[x]^2,
    dividing by the scale or multiplying by its reciprocal."""
    ln, lin = g["n"].params, g["y"].params
    w32, b32 = ln["weight"].float().numpy(), ln["bias"].float().numpy()
    a32 = lin["weight"].float().numpy()
    d = w32.shape[0]
    rng = np.random.default_rng(order_seed)
    perm = rng.permutation(d)

    def seq_sum(v, order):
        acc = np.float32(0)
        for i in order:
            acc = np.float32(acc + v[i])
        return acc

    def engine(order, two_pass, divide):
        def f(x):
            out = []
            for row in x.to(torch.float32).numpy():
                mu = np.float32(seq_sum(row, order) / np.float32(d))
                c = (row - mu).astype(np.float32)
                if two_pass:
                    var = np.float32(seq_sum((c * c).astype(np.float32), order) / np.float32(d))
                else:
                    msq = np.float32(seq_sum((row * row).astype(np.float32), order) / np.float32(d))
                    var = np.float32(msq - np.float32(mu * mu))
                sd = np.float32(np.sqrt(np.float32(var + np.float32(1e-5))))
                n = (c / sd).astype(np.float32) if divide else (c * np.float32(1 / sd)).astype(np.float32)
                y = (w32 * n + b32).astype(np.float32)
                out.append(torch.from_numpy(y) @ torch.from_numpy(a32).T)
            return torch.stack(out).double()
        return f

    orders = [np.arange(d), np.arange(d)[::-1], perm]
    return [engine(o, tp, dv) for o in orders for tp in (True, False) for dv in (True, False)]


@pytest.mark.parametrize("arithmetic", ["float32", "float32-probabilistic"])
@pytest.mark.parametrize("eps", [0.0, 1e-4])
def test_norm_then_cancelling_linear_contains_float32_engines(eps, arithmetic):
    """A row mean of 200 with unit spread: the mean's rounding is large (gamma_d * 200) but
    shared by the row, and the linear after the norm cancels it.  The bounds charge it
    through the signed sums (below the elementwise charge; the variance's rounding, shared
    too, does not cancel here) and still contain every
    float32 engine's outputs, in every order and formula (box samples + PGD), in the default
    mode and in the probabilistic one (whose one-pass variance joins its two sums' errors)."""
    # d = 384 in the probabilistic mode: there the model's sums (197 U) are below gamma_d (388 U), so
    # the one-pass variance's quadrature is what binds (checked here); a row mean of 20 keeps its q below 1
    g, x0 = _ln_then_cancel(d=384, offset=20.0) if arithmetic == "float32-probabilistic" else _ln_then_cancel()
    if arithmetic == "float32-probabilistic":
        xi = Interval(x0 - eps, x0 + eps)
        vh = ((x0 - x0.mean(-1, keepdim=True)) ** 2).mean(-1, keepdim=True) * 2
        d = x0.shape[-1]
        joint = fpmargin.one_pass_variance_error(xi, vh, 1e-5, fpprob.norm_sums(d + 4), fpprob.norm_sums_model(d + 4))
        assert (joint < 0.8 * fpmargin.one_pass_variance_error(xi, vh, 1e-5, fpprob.norm_sums(d + 4))).all()
    r = compute_bounds(g, x0, eps, "crown", allow_zero=True, arithmetic=arithmetic)
    assert torch.isfinite(r.width()).all()
    real = compute_bounds(g, x0, eps, "crown", arithmetic="real", allow_zero=True)
    ln = r.nodes["n"]
    lin_in = compute_bounds(g, x0, eps, "ibp", allow_zero=True).nodes["x"]
    elementwise = fpmargin.margin(g["n"], [lin_in], ln)                        # the old charge per unit |lam|
    old_charge = elementwise @ g["y"].params["weight"].abs().T
    charged = r.width() - real.width()
    assert (charged < old_charge).all() and charged.sum() < 0.6 * old_charge.sum()
    fns = _float32_engines(g, order_seed=5) + [graph_fn(g, torch.float32)]
    gen = torch.Generator().manual_seed(8)
    pts = [x0] + [(x0 + eps * (2 * torch.rand(x0.shape, generator=gen, dtype=torch.float64) - 1)).float().double()
                  for _ in range(20)]
    for f in fns:
        for p in pts:
            y = f(p)
            assert (y >= r.lower).all() and (y <= r.upper).all()
    if eps > 0:
        assert violations(graph_fn(g, torch.float32), x0, eps, r.lower, r.upper, n_samples=500, steps=20,
                          seed=2) == 0


def test_token_compact_and_dense_walks_charge_the_shared_errors_alike():
    g, x0 = _ln_then_cancel(d=16, offset=50.0)
    a = compute_bounds(g, x0, 1e-3, "crown")
    b = compute_bounds(g, x0, 1e-3, "crown", tunings=Tunings(compact_rows=False))
    assert torch.allclose(a.lower, b.lower, rtol=1e-12, atol=1e-15)
    assert torch.allclose(a.upper, b.upper, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("d", [64, 384])
@pytest.mark.parametrize("model", [False, True])
def test_one_pass_variance_error_bound_holds_for_float32_engines(d, model):
    """``fpmargin.one_pass_variance_error`` (unhedged) against float32 E[x^2] - E[x]^2
    variances: rows of mean 0, 3, -30 and 300 with unit spread, points of a box around
    them (centre, corners, random), the two sums in five orders (forward, reverse, random,
    pairwise, largest first), the mean squared by a float32 product or an FMA, with and
    without a clamp at zero.  Every float32 ``var + eps`` is within the bound of the real
    one.  The bound is never above the former ``2 g (A + mean|x|^2) + U (vh + eps)``, and on
    the zero-mean row it is about half of it (the mean's part scales with |mean|).  ``model``:
    the probabilistic mode's form (the sums' relative bound under the model, their errors
    joined in quadrature), which these float32 sums obey as well, never above the form that
    adds the two with the same relative bound.  Both with each sum's error also bounded from its
    terms' sorted sizes (any summation tree, gamma.bounds.fpsum), never above the form without."""
    gen = torch.Generator().manual_seed(41)
    rng = np.random.default_rng(41)
    offsets = torch.tensor([0.0, 3.0, -30.0, 300.0], dtype=torch.float64)[:, None]
    c = (torch.randn(4, d, generator=gen, dtype=torch.float64) + offsets).float().double()
    c = c - (c.mean(-1, keepdim=True) - offsets) * (offsets == 0)            # the first row's mean ~ 0
    c = c.float().double()
    eps, U = 1e-5, fpmargin.U
    g = fpprob.norm_sums(d + 4) if model else fpmargin.fp.gamma(d + 4)
    joint = fpprob.norm_sums_model(d + 4) if model else None
    # float32 points (what an engine reads) around c, the box their elementwise hull
    pts = [c] + [(c + 1e-3 * (2 * torch.rand(c.shape, generator=gen, dtype=torch.float64) - 1)).float().double()
                 for _ in range(4)]
    x = Interval(torch.stack(pts).amin(0), torch.stack(pts).amax(0))
    pts += [x.lower, x.upper]
    vh = torch.stack([((p - p.mean(-1, keepdim=True)) ** 2).mean(-1) for p in pts]).amax(0)[:, None] * (1 + 1e-6)
    plain = fpmargin.one_pass_variance_error(x, vh, eps, g, joint)
    assert (plain <= fpmargin.one_pass_variance_error(x, vh, eps, g)).all()
    # each sum's error also from its terms' sizes in any summation tree (gamma.bounds.fpsum)
    tree, coef = (fpprob.norm_sum_tree, fpprob.norm_sum_coef) if model else (fpmargin.fpsum.tree_error, None)
    bound = fpmargin.one_pass_variance_error(x, vh, eps, g, joint, tree, coef)
    assert (bound <= plain).all() and (bound < 0.9 * plain).any()
    xa = x.abs_max()
    old = 2 * g * ((xa * xa).mean(-1, keepdim=True) + xa.mean(-1, keepdim=True) ** 2) + U * (vh + eps)
    assert (bound <= old).all() and bound[0] < 0.55 * old[0]
    worst = torch.zeros(4, 1, dtype=torch.float64)
    for p in pts:
        assert (p >= x.lower).all() and (p <= x.upper).all()
        v_real = ((p - p.mean(-1, keepdim=True)) ** 2).mean(-1, keepdim=True) + eps
        assert (v_real - eps <= vh).all()
        for r, row in enumerate(p.float().numpy()):
            for how in ("forward", "reverse", "random", "pairwise", "largest first"):
                mu = np.float32(f32_sum(row, how, rng) / np.float32(d))
                msq = np.float32(f32_sum((row * row).astype(np.float32), how, rng) / np.float32(d))
                for fma in (False, True):
                    var = np.float32(float(msq) - float(mu) * float(mu)) if fma else np.float32(msq - np.float32(mu * mu))
                    for clamp in (False, True):
                        v32 = np.float32(max(var, np.float32(0)) if clamp else var)
                        err = abs(float(np.float32(v32 + np.float32(eps))) - float(v_real[r]))
                        worst[r] = max(float(worst[r]), err)
    assert (worst <= bound).all()
    assert (worst[3] > 0.01 * bound[3]).all()          # the large-mean row: the bound is not vacuous there


@pytest.mark.parametrize("d", [64, 384])
@pytest.mark.parametrize("model", [False, True])
def test_two_pass_variance_error_bound_holds_for_float32_engines(d, model):
    """``fpmargin.two_pass_variance_error`` (unhedged) against float32 two-pass variances
    ``mean((x - mu')^2)``: rows of mean 0, 3, -30 and 300 with unit spread, points of a box
    around them, the mean and the sum of squares each in five orders, divided by d or
    multiplied by a rounded 1 / d.  Every float32 ``var + eps`` is within the bound, with the
    mean's error e_mu from its tree bound.  The bound drops the shared error's first-order
    term (``2 mean|c| e_mu``, since the centred row sums to zero): on the mean-300 row it is
    below a third of the form that keeps it."""
    gen = torch.Generator().manual_seed(43)
    rng = np.random.default_rng(43)
    offsets = torch.tensor([0.0, 3.0, -30.0, 300.0], dtype=torch.float64)[:, None]
    c = (torch.randn(4, d, generator=gen, dtype=torch.float64) + offsets).float().double()
    eps, U = 1e-5, fpmargin.U
    tree = fpprob.norm_sum_tree if model else fpmargin.fpsum.tree_error
    pts = [c] + [(c + 1e-3 * (2 * torch.rand(c.shape, generator=gen, dtype=torch.float64) - 1)).float().double()
                 for _ in range(4)]
    x = Interval(torch.stack(pts).amin(0), torch.stack(pts).amax(0))
    pts += [x.lower, x.upper]
    xa = x.abs_max()
    mean_lo, mean_hi = x.lower.mean(-1, keepdim=True), x.upper.mean(-1, keepdim=True)
    c_abs = torch.maximum((x.upper - mean_lo).abs(), (x.lower - mean_hi).abs())      # |x_i - mean(x)| over the box
    e_mu = tree(xa) / d
    e_d = U * (c_abs + e_mu)
    vh = torch.stack([((p - p.mean(-1, keepdim=True)) ** 2).mean(-1) for p in pts]).amax(0)[:, None] * (1 + 1e-6)
    bound = fpmargin.two_pass_variance_error(c_abs, e_mu, e_d, vh, eps, tree)
    kept = bound + (2 * c_abs * e_mu).mean(-1, keepdim=True) * (1 + U) ** 2      # with the first-order term
    assert bound[3] < kept[3] / 3
    worst = torch.zeros(4, 1, dtype=torch.float64)
    for p in pts:
        v_real = ((p - p.mean(-1, keepdim=True)) ** 2).mean(-1, keepdim=True) + eps
        for r, row in enumerate(p.float().numpy()):
            for how in ("forward", "reverse", "random", "pairwise", "largest first"):
                s = f32_sum(row, how, rng)
                for mu in (np.float32(s / np.float32(d)), np.float32(s * np.float32(1.0 / d))):
                    cc = (row - mu).astype(np.float32)
                    sq = f32_sum((cc * cc).astype(np.float32), how, rng)
                    for var in (np.float32(sq / np.float32(d)), np.float32(sq * np.float32(1.0 / d))):
                        err = abs(float(np.float32(var + np.float32(eps))) - float(v_real[r]))
                        worst[r] = max(float(worst[r]), err)
    assert (worst <= bound).all()
    assert (worst > 0.005 * bound).all()                # not vacuous on any row


def _rms_engines(w: torch.Tensor, eps: float, order_seed: int):
    """float32 RMSNorms (rows on the last axis) as engines compute them: transformers' (torch:
    ``x * rsqrt(mean(x^2) + eps)``, then the weight), llama.cpp's (the squares summed in double,
    ``1.0f / sqrtf``, then the weight as its own op), and ctranslate2-style float32 loops: the sum
    in three orders, then ``x * inv * w``, ``x * (w * inv)`` or ``x / sqrt(.) * w``."""
    w32 = w.float().numpy()
    d = w32.shape[0]
    perm = np.random.default_rng(order_seed).permutation(d)

    def transformers(x):
        h = x.float()
        var = h.pow(2).mean(-1, keepdim=True)
        return (w.float() * (h * torch.rsqrt(var + eps))).double()

    def llama_cpp(x):
        out = []
        for row in x.float().numpy():
            s = float(np.sum((row * row).astype(np.float32).astype(np.float64)))
            mean = np.float32(s / d)
            scale = np.float32(np.float32(1.0) / np.sqrt(np.float32(mean + np.float32(eps))))
            out.append(((row * scale).astype(np.float32) * w32).astype(np.float32))
        return torch.from_numpy(np.stack(out)).double()

    def loop(order, form):
        def f(x):
            out = []
            for row in x.float().numpy():
                acc = np.float32(0)
                for i in order:
                    acc = np.float32(acc + np.float32(row[i] * row[i]))
                sd = np.sqrt(np.float32(np.float32(acc / np.float32(d)) + np.float32(eps)))
                inv = np.float32(np.float32(1.0) / sd)
                if form == "divide":
                    y = ((row / sd).astype(np.float32) * w32).astype(np.float32)
                elif form == "weight first":
                    y = (row * (w32 * inv).astype(np.float32)).astype(np.float32)
                else:
                    y = ((row * inv).astype(np.float32) * w32).astype(np.float32)
                out.append(y)
            return torch.from_numpy(np.stack(out)).double()
        return f

    orders = [np.arange(d), np.arange(d)[::-1], perm]
    return [transformers, llama_cpp] + [loop(o, f) for o in orders for f in ("inv", "weight first", "divide")]


@pytest.mark.parametrize("arithmetic", ["float32", "float32-probabilistic"])
def test_rmsnorm_margin_unhedged_but_its_rsqrt_holds_for_float32_engines(arithmetic):
    """RMSNorm's margin is derived but for the library's rsqrt (whose allowance alone is doubled),
    so it is not hedged as a whole: float32 RMSNorms as transformers, llama.cpp and ctranslate2-style
    loops compute them (11 engines), at points of a box around rows of unit spread, of spread 1e3 and
    with one massive activation, stay within it element by element, and CROWN's bounds of
    RMSNorm -> linear contain their outputs (points + PGD) at eps 0 and 1e-4."""
    d = 576
    gen = torch.Generator().manual_seed(47)
    w = (1 + 0.3 * torch.randn(d, generator=gen, dtype=torch.float64)).float().double()
    c = torch.randn(3, d, generator=gen, dtype=torch.float64)
    c[1] *= 1e3
    c[2, 11] = 3e3                                                       # a massive activation
    c = c.float().double()
    g = Graph("rms", "x", (3, d))
    g.add("n", "rmsnorm", "x", weight=w, eps=1e-6)
    g.add("y", "linear", "n", weight=torch.randn(4, d, generator=gen, dtype=torch.float64).float().double() / d ** 0.5)
    g.infer_shapes()
    engines = _rms_engines(w, 1e-6, order_seed=3)
    exact = lambda p: w * p * ((p * p).mean(-1, keepdim=True) + 1e-6).rsqrt()
    worst = 0.0
    for eps in (0.0, 1e-4):
        x = Interval(c - eps, c + eps)
        out = compute_bounds(g, c, eps, "ibp", arithmetic="real", allow_zero=True).nodes["n"]
        parts = fpmargin.norm_modes(g["n"], [x], out, fpprob.NORM_SUMS if arithmetic != "float32" else None)
        m = parts.total()
        pts = [c] + [(c + eps * (2 * torch.rand(c.shape, generator=gen, dtype=torch.float64) - 1)).float().double()
                     for _ in range(3)]
        for p in pts:
            for f in engines:
                err = (f(p) - exact(p)).abs()
                assert (err <= m).all()
                worst = max(worst, float((err / m).max()))
        r = compute_bounds(g, c, eps, "crown", arithmetic=arithmetic, allow_zero=True)
        lin = g["y"].params["weight"].float()
        for p in pts:
            for f in engines:
                y = (f(p).float() @ lin.T).double()                      # the linear in float32 as well
                assert (y >= r.lower).all() and (y <= r.upper).all()
        if eps > 0:
            assert violations(graph_fn(g, torch.float32), c, eps, r.lower, r.upper, n_samples=300, steps=10,
                              seed=4) == 0
    assert worst > 0.02                                                  # the margin is not vacuous

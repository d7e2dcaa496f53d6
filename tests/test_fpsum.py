"""The rounding bound of one float32 sum in any summation tree (gamma.bounds.fpsum):
the lemma on partial sums checked on explicit trees, the bounds by hand, and against
float32 sums in the orders engines use."""

import math

import numpy as np
import pytest
import torch

from gamma.bounds import fp, fpprob, fpsum
from soundness import f32_sum

U = fp.U


def _tree_partials(t: np.ndarray, how: str, rng) -> list:
    """Exact partial sums (float64 of float64 terms: exact enough here) at every addition
    of a summation tree over t: 'forward', 'pairwise', 'lanes' (8 running sums, then
    joined), or 'random' (two random operands merged until one is left)."""
    items = [float(v) for v in t]
    out = []
    if how == "forward":
        acc = items[0]
        for v in items[1:]:
            acc += v
            out.append(acc)
    elif how == "pairwise":
        while len(items) > 1:
            nxt = []
            for i in range(0, len(items) - 1, 2):
                nxt.append(items[i] + items[i + 1])
                out.append(nxt[-1])
            if len(items) % 2:
                nxt.append(items[-1])
            items = nxt
    elif how == "lanes":
        lanes = [items[i::8] for i in range(8)]
        sums = []
        for lane in lanes:
            acc = lane[0]
            for v in lane[1:]:
                acc += v
                out.append(acc)
            sums.append(acc)
        acc = sums[0]
        for v in sums[1:]:
            acc += v
            out.append(acc)
    else:
        while len(items) > 1:
            i, j = sorted(rng.choice(len(items), 2, replace=False))
            s = items[i] + items[j]
            out.append(s)
            items = [v for k, v in enumerate(items) if k not in (i, j)] + [s]
    assert len(out) == len(t) - 1
    return out


@pytest.mark.parametrize("how", ["forward", "pairwise", "lanes", "random"])
def test_partial_sums_within_the_sorted_prefix_sums(how):
    """sum_k |p_k| <= sum_{L>=2} T_L and sum_k p_k^2 <= sum_{L>=2} T_L^2 on every tree,
    for terms of one sign, of both signs, heavy-tailed, with ties."""
    rng = np.random.default_rng(3)
    rows = [rng.standard_normal(97), np.abs(rng.standard_normal(64)), rng.standard_cauchy(50),
            np.ones(33), np.r_[100.0, np.full(40, 0.01)]]
    for t in rows:
        for _ in range(5):
            t = rng.permutation(t)
            p = np.abs(_tree_partials(t, how, rng))
            T = np.cumsum(np.sort(np.abs(t))[::-1])[1:]
            assert p.sum() <= T.sum() * (1 + 1e-12)
            assert (p ** 2).sum() <= (T ** 2).sum() * (1 + 1e-12)


def test_the_lemma_is_attained_left_to_right_largest_first():
    """Terms of one sign added largest first: the partial sums are T_2 .. T_n exactly."""
    t = np.array([5.0, 4.0, 2.0, 1.0, 0.5])
    p = _tree_partials(t, "forward", None)
    T = torch.tensor(t)[None].sort(-1, descending=True).values.cumsum(-1)[0, 1:]        # T_2 .. T_n
    assert p == T.tolist() == [9.0, 11.0, 12.0, 12.5]
    # so the deterministic bound's addition term is reached: tree_error = U (1 + g) (sum T + 5 S) exactly
    g = float(fp.gamma(len(t) + 4))
    assert float(fpsum.tree_error(torch.tensor(t)[None])) == pytest.approx(
        U * (1 + g) * (sum(p) + 5 * 12.5) * (1 + 2.0 ** -40), rel=1e-15)


def test_bounds_by_hand():
    t = torch.tensor([[1.0, 4.0, 2.0, 3.0]], dtype=torch.float64)       # S = 10, T_2..T_4 = 7, 9, 10
    g8 = 8 * U / (1 - 8 * U)
    f64 = 1 + 2.0 ** -40
    assert float(fpsum.tree_error(t)) == pytest.approx(U * (1 + g8) * (26 + 50) * f64, rel=1e-15)
    assert float(fpsum.tree_coef(t)) == pytest.approx((1 + g8) * math.sqrt(49 + 81 + 100 + 500) * f64, rel=1e-15)
    # one term carries everything: every T_L = S, the bounds are gamma_{n+4} S and sqrt(n + 4) S (1 + gamma_{n+4})
    one = torch.zeros(1, 384, dtype=torch.float64)
    one[0, 7] = 2.5
    g = float(fp.gamma(388))
    assert float(fpsum.tree_error(one)) == pytest.approx(g * 2.5, rel=1e-12)
    assert float(fpsum.tree_coef(one)) == pytest.approx(math.sqrt(388) * 2.5 * (1 + g), rel=1e-12)
    # equal terms: about half and a third (its square root) of the worst order's
    eq = torch.ones(1, 384, dtype=torch.float64)
    assert float(fpsum.tree_error(eq)) / (g * 384) == pytest.approx((384 * 385 / 2 - 1 + 5 * 384) / (388 * 384), rel=1e-6)
    assert float(fpsum.tree_error(eq)) < 0.52 * g * 384
    assert float(fpsum.tree_coef(eq)) < 0.6 * math.sqrt(388) * 384
    # the model's bound: LAMBDA U times the coefficients' norm, never above the deterministic one
    x = torch.randn(6, 384, generator=torch.Generator().manual_seed(2), dtype=torch.float64).abs()
    assert torch.allclose(fpprob.norm_sum_coef(x), 10 * U * fpsum.tree_coef(x), rtol=1e-11)
    assert (fpprob.norm_sum_tree(x) <= fpsum.tree_error(x)).all()
    assert (fpprob.norm_sum_tree(x) < 0.6 * fpsum.tree_error(x)).all()         # 0.54 here
    assert (fpsum.tree_error(x) <= float(fp.gamma(388)) * x.sum(-1, keepdim=True) * (1 + 2.0 ** -40)).all()


@pytest.mark.parametrize("d", [64, 384])
def test_float32_means_within_the_tree_bound(d):
    """Float32 row means (sum then divide, or times a rounded 1 / d), and means of float32
    squares, in six orders: every error within ``tree_error(|t|) / d``, of terms of one
    sign, of both, heavy-tailed and offset rows.  On the offset rows (every term about the
    same size, and every addition rounding towards one side) the error reaches a share of it."""
    rng = np.random.default_rng(11)
    rows = [rng.standard_normal(d), 3 + rng.standard_normal(d), 300 + rng.standard_normal(d),
            rng.standard_cauchy(d), np.abs(rng.standard_normal(d)) * 1e3]
    worst_share = 0.0
    for row in rows:
        x32 = row.astype(np.float32)
        x64 = x32.astype(np.float64)
        # (float32 terms, the exact sum of what they stand for, those terms' sizes)
        for terms, exact_sum, sizes in ((x32, x64.sum(), np.abs(x64)),
                                        ((x32 * x32).astype(np.float32), (x64 * x64).sum(), x64 * x64)):
            exact = exact_sum / d
            bound = float(fpsum.tree_error(torch.from_numpy(sizes)[None])) / d
            assert bound <= float(fp.gamma(d + 4)) * sizes.sum() / d * (1 + 1e-12)
            for how in ("forward", "reverse", "random", "pairwise", "largest first", "lanes"):
                s = f32_sum(terms, how, rng)
                for mean in (np.float32(s / np.float32(d)), np.float32(s * np.float32(1.0 / d))):
                    err = abs(float(mean) - exact)
                    assert err <= bound
                    worst_share = max(worst_share, err / bound)
    assert worst_share > 0.01

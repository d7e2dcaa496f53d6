"""Where a bound's slack is first-order and where it is second-order (issue 19, a diagnostic).

For a case (a block of a real model on its nominal input +- eps, T=8), real arithmetic, CROWN:

* the **first-order range** of every output, ``2 eps sum_j |dy_i/dx_j|`` at the box centre (the
  exact Jacobian, by forward-mode derivatives): the range of the function's linearisation over
  the box.  It is neither an inner nor an outer bound; where the function is nearly linear over
  the box it is what an attack reaches;
* certified width / first-order range per output: at a tiny eps every remainder that is second
  order in eps vanishes, so a ratio above 1 there is first-order slack of some relaxation; the
  same ratio at the working eps shows how much the second-order remainders add;
* ``--ideal``: the output's width again with the remainders of the attention products
  (``|dx dy| <= rx ry``, read through the value or the two projection layers) set to zero, and
  with those of every product (SwiGLU's too).  **Not a bound**: an upper limit of what any
  tighter relaxation of those products, one product at a time, could take off.

    python benchmarks/first_order.py [--models whisper,smollm2] [--eps 1e-7,1e-5,1e-3] [--ideal] [--out BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

from depth import T, emit, graph_and_point  # noqa: E402  (the same models, T and block inputs)
from gamma.bounds import compute_bounds  # noqa: E402
from gamma.io import zoo  # noqa: E402
from gamma.ops import evaluate  # noqa: E402

SECTION = "14. First-order and second-order slack (real arithmetic)"
ATTENTION_PRODUCTS = ("attn.av", "attn.qk")


def first_order_range(graph, x: torch.Tensor, chunk: int = 64) -> dict:
    """name -> ``sum_j |d node / d x_j|`` at ``x`` (the node's shape), for every node but the
    input: one forward-mode derivative per input element, ``chunk`` at a time."""
    names = [n.name for n in graph if n.op != "input"]

    def f(xx):
        v = evaluate(graph, xx, keep_all=True)
        return tuple(v[n] for n in names)

    n_in = x.numel()
    acc = None
    for j0 in range(0, n_in, chunk):
        k = min(chunk, n_in - j0)
        tang = torch.zeros(k, n_in, dtype=x.dtype)
        tang[torch.arange(k), torch.arange(j0, j0 + k)] = 1
        outs = torch.func.vmap(lambda t: torch.func.jvp(f, (x,), (t,))[1])(tang.reshape(k, *x.shape))
        part = [o.abs().sum(0) for o in outs]
        acc = part if acc is None else [a + b for a, b in zip(acc, part)]
    return dict(zip(names, acc))


@contextlib.contextmanager
def without_remainders(elementwise: bool = False):
    """CROWN with the remainders of the attention products (``attn.av``, ``attn.qk``) set to zero,
    and with ``elementwise`` those of the elementwise products (SwiGLU's) as well.
    NOT SOUND: a diagnostic of how much those remainders cost, never a bound."""
    from gamma.bounds import crown_rules
    orig, orig_mul = crown_rules._remainder, crown_rules.RULES["mul"]

    def zero(node, lam, ctx, x, y):
        r = orig(node, lam, ctx, x, y)
        return r * 0 if node.name.endswith(ATTENTION_PRODUCTS) else r

    def mul(node, lam, ctx):
        ins, odd, even = orig_mul(node, lam, ctx)
        return ins, odd, None

    crown_rules._remainder = zero
    if elementwise:
        crown_rules.RULES["mul"] = mul
    try:
        yield
    finally:
        crown_rules._remainder, crown_rules.RULES["mul"] = orig, orig_mul


def ratios(width: torch.Tensor, first: torch.Tensor) -> dict:
    """Max-width ratio and per-element median / worst of ``width / first`` over the elements
    whose first-order range is at least 1e-3 of the largest (the others are noise)."""
    ok = first >= 1e-3 * first.max()
    r = width[ok] / first[ok]
    return {"max": float(width.max() / first.max()), "median": float(r.median()), "worst": float(r.max())}


def worst_node(graph, res, first, need, eps) -> tuple:
    """The needed node (one whose bounds a relaxation reads; not those only LayerNorms read,
    whose refinement reads the centred input and the mean) with the largest median ratio."""
    best = ("-", 0.0)
    for n in graph:
        if n.name in need and n.name in first:
            b = res.nodes[n.name]
            med = ratios(b.upper - b.lower, 2 * eps * first[n.name])["median"]
            if med > best[1]:
                best = (n.name, med)
    return best


def measure(label, path, scope, eps_list, ideal: bool) -> list[dict]:
    from gamma.bounds.engine import needs_bounds, norm_fed
    g, x = graph_and_point(path, scope)
    t0 = time.perf_counter()
    first = first_order_range(g, x)
    jac_s = time.perf_counter() - t0
    need = needs_bounds(g)
    need -= norm_fed(g, need)          # a LayerNorm input's box: its centred part and mean are what is read
    rows = []
    for eps in eps_list:
        t0 = time.perf_counter()
        res = compute_bounds(g, x, eps, "crown", arithmetic="real")
        secs = time.perf_counter() - t0
        fo = 2 * eps * first[g.output]
        row = {"label": label, "scope": scope, "eps": eps, "first": float(fo.max()),
               "certified": float((res.upper - res.lower).max()), "seconds": secs, "jacobian_s": jac_s,
               **ratios(res.upper - res.lower, fo), "node": worst_node(g, res, first, need, eps)}
        if ideal:
            for key, elementwise in (("ideal", False), ("ideal_all", True)):
                with without_remainders(elementwise):
                    r0 = compute_bounds(g, x, eps, "crown", arithmetic="real")
                row[key] = float((r0.upper - r0.lower).max())
        rows.append(row)
        print(row, flush=True)
    return rows


def _g(v) -> str:
    return f"{v:.3g}"


def table(rows) -> list[str]:
    ideal = any("ideal" in r for r in rows)
    head = ["model", "scope", "eps", "first-order range", "certified (real)", "ratio",
            "median / worst per output", "needed node with the largest median ratio"]
    if ideal:
        head += ["without the attention products' remainders (not a bound)",
                 "without every product's remainder (not a bound)"]
    head.append("seconds (bound / Jacobian)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["label"], r["scope"], f"{r['eps']:g}", _g(r["first"]), _g(r["certified"]),
                 f"**{r['max']:.3g}**", f"{r['median']:.3g} / {r['worst']:.3g}",
                 f"{r['node'][0]} ({r['node'][1]:.3g})"]
        if ideal:
            cells += [_g(r["ideal"]) if "ideal" in r else "-", _g(r["ideal_all"]) if "ideal_all" in r else "-"]
        cells.append(f"{r['seconds']:.1f} / {r['jacobian_s']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="whisper,smollm2")
    ap.add_argument("--eps", default="1e-7,1e-5,1e-3")
    ap.add_argument("--whisper-blocks", default="0,2")
    ap.add_argument("--smollm2-blocks", default="0,15")
    ap.add_argument("--ideal", action="store_true", help="also without the attention products' remainders")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    eps_list = [float(e) for e in args.eps.split(",")]
    rows = []
    if "whisper" in args.models:
        for b in args.whisper_blocks.split(","):
            rows += measure("Whisper tiny.en", zoo.whisper_tiny_en(), f"layer{b}", eps_list, args.ideal)
    if "smollm2" in args.models:
        for b in args.smollm2_blocks.split(","):
            rows += measure("SmolLM2-135M", zoo.smollm2_135m(), f"layer{b}", eps_list, args.ideal)
    load = os.getloadavg()
    cmd = "python benchmarks/first_order.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [f"## {SECTION}", "",
             f"CROWN, T={T}, real arithmetic, `{cmd.strip()}` (load average {load[0]:.1f} at the end). "
             "A block on its nominal input +- eps. First-order range: `2 eps sum_j |dy/dx_j|` at the centre "
             "(the linearisation's range over the box; neither an inner nor an outer bound). Ratio: certified / "
             "first-order max width; per output over the outputs whose first-order range is at least 1e-3 of "
             "the largest. Needed node: of the nodes whose bounds a relaxation reads, the one whose median "
             "ratio is largest.", ""] + table(rows) + [""]
    emit("\n".join(lines), args.out, SECTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())

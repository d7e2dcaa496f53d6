"""Section 1 of ``run.py``: IBP cost in nominal forward passes (whole real
models and their first block), the thread-count check and the per-op split."""

from __future__ import annotations

import statistics
import time
from collections import defaultdict

import torch

import gamma
import gamma.io.zoo
from gamma.bounds import compute_bounds
from gamma.ops import evaluate

from _common import EPS, LABELS, fmt_s, load_avg, log, sync, table, timed, zoo_models


class _IbpTimer:
    """Seconds of IBP per op type (the interval rule and the float32 margin),
    taken by wrapping the engine's two per-node calls while active."""

    def __init__(self, device: str):
        self.device = device
        self.rule, self.margin, self.count = defaultdict(float), defaultdict(float), defaultdict(int)

    def _wrap(self, fn, acc, count):
        def wrapped(node, *a):
            t0 = time.perf_counter()
            out = fn(node, *a)
            sync(self.device)
            acc[node.op] += time.perf_counter() - t0
            if count is not None:
                count[node.op] += 1
            return out
        return wrapped

    def __enter__(self):
        from gamma.bounds import engine
        self._orig = engine.ibp_node, engine.margin_split
        engine.ibp_node = self._wrap(self._orig[0], self.rule, self.count)
        engine.margin_split = self._wrap(self._orig[1], self.margin, None)
        return self

    def __exit__(self, *exc):
        from gamma.bounds import engine
        engine.ibp_node, engine.margin_split = self._orig

    def ops(self) -> dict:
        return {op: (self.count[op], self.rule[op], self.margin[op]) for op in self.count}


def ibp_ratio(graph, x, repeats: int, budget: float, device: str = "cpu", eps: float = EPS,
              breakdown: bool = False) -> dict:
    """Nominal forward vs IBP on the same graph and point, alternated in this
    process after one warm-up forward: ``repeats`` pairs, or fewer (at least 2)
    once ``budget`` seconds are spent.  With ``breakdown`` the last IBP run is
    also split per op type (the wrapper costs a clock read per node)."""
    graph.to(device)
    x = x.to(device=device, dtype=torch.float64)
    fwd, ibp, split = [], [], None
    with torch.no_grad():
        timed(lambda: evaluate(graph, x), device)
        res = compute_bounds(graph, x, eps, "ibp", device=device)
        bounded = sum(bool(torch.isfinite(iv.lower).all() and torch.isfinite(iv.upper).all())
                      for iv in res.nodes.values())
        del res
        t_start = time.perf_counter()
        for i in range(repeats):
            last = i == repeats - 1 or (i >= 1 and time.perf_counter() - t_start
                                        + (time.perf_counter() - t_start) / (i + 1) > budget)
            fwd.append(timed(lambda: evaluate(graph, x), device))
            if last and breakdown:
                with _IbpTimer(device) as tm:
                    ibp.append(timed(lambda: compute_bounds(graph, x, eps, "ibp", device=device), device))
                split = {"total": ibp[-1], "ops": tm.ops()}
            else:
                ibp.append(timed(lambda: compute_bounds(graph, x, eps, "ibp", device=device), device))
            if last:
                break
    f, i = statistics.median(fwd), statistics.median(ibp)
    pairs = [b / a for a, b in zip(fwd, ibp)]
    return {"forward_s": f, "ibp_s": i, "ratio": i / f, "pair_min": min(pairs), "pair_max": max(pairs),
            "repeats": len(fwd), "forward_all": fwd, "ibp_all": ibp, "breakdown": split,
            "bounded_nodes": bounded, "nodes": len(graph.nodes)}


def threads_table(args, results: dict) -> list[str]:
    """Forward and IBP on Whisper tiny.en at this run's thread count and at 1
    thread, alternated: on a shared machine, OpenMP threads that wait for a
    busy core can cost more than they bring."""
    n = torch.get_num_threads()
    if n == 1 or args.device != "cpu":
        return []
    m = gamma.load(gamma.io.zoo.whisper_tiny_en())
    T = args.ibp_T[0]
    graph, x = m.graph(None, T), m.input_point(None, T).x
    log(f"threads: {n} vs 1 on Whisper T={T} (load {load_avg()})")
    got = {n: ([], []), 1: ([], [])}
    with torch.no_grad():
        evaluate(graph, x)
        for _ in range(3):
            for th in (n, 1):
                torch.set_num_threads(th)
                got[th][0].append(timed(lambda: evaluate(graph, x), "cpu"))
                got[th][1].append(timed(lambda: compute_bounds(graph, x, EPS, "ibp"), "cpu"))
    torch.set_num_threads(n)
    rows = [[th, fmt_s(statistics.median(f)), fmt_s(statistics.median(i)),
             f"{statistics.median(i) / statistics.median(f):.1f}"] for th, (f, i) in got.items()]
    results["threads"] = {th: {"forward": f, "ibp": i} for th, (f, i) in got.items()}
    return ["", f"Thread count under this run's load (Whisper tiny.en encoder, T={T}, median of 3, {n} and 1 torch "
            f"threads alternated; load avg {load_avg()}): when other jobs hold the cores, OpenMP threads waiting "
            "at barriers can make the multi-threaded run slower than one thread, inflating every time in this "
            "file.", ""] + table(["torch threads", "forward s", "IBP s", "IBP / forward"], rows)


def _ibp_row(label: str, T: int, r: dict) -> list:
    ok = "yes" if r["ratio"] <= 4 else "**no**"
    return [label, T, f"{r['nodes']} ({r['bounded_nodes']})", r["repeats"], fmt_s(r["forward_s"]),
            fmt_s(r["ibp_s"]), f"**{r['ratio']:.1f}**", f"{r['pair_min']:.1f} - {r['pair_max']:.1f}", ok, load_avg()]


def section_ibp(args, out: list[str], results: dict) -> None:
    t_sec = time.perf_counter()
    out += ["## 1. IBP cost in nominal forward passes (whole models)", "",
            f"Nominal forward: `gamma.ops.evaluate(graph, x)`; IBP: `gamma.bounds.compute_bounds(graph, x, {EPS:g}, "
            "\"ibp\")` (float64 with the float32 error margins, as `gamma verify` computes). Both on the same graph "
            f"and point, alternated in one process after one warm-up forward; median of N each. Device: {args.device}. "
            "'ratio' = median IBP / median forward; 'pairs' = range of IBP_i / forward_i over the N adjacent pairs. "
            f"N = up to {args.repeats} pairs, fewer (at least 2) once a configuration has used "
            f"{args.ibp_budget:.0f} s. 'bounded' = nodes whose IBP bounds are finite everywhere. Target: ratio <= 4.",
            "",
            "Read the whole-model rows with the 'bounded' column: on these real models IBP's bounds (the float32 "
            "margins included, whatever epsilon) become unbounded within the first two blocks, and a node whose "
            "inputs are all unbounded everywhere is unbounded at no cost, so the whole-model ratio mostly measures "
            "the bounded prefix.  The second table measures the rules where every bound is finite: the first "
            "block alone, at its nominal input.", ""]
    rows, brows, crumbs = [], [], []
    for key, path in zoo_models(args.ibp_models).items():
        m = gamma.load(path)
        for j, T in enumerate(args.ibp_T):
            graph, x = m.graph(None, T), m.input_point(None, T).x
            log(f"IBP ratio: {LABELS[key]} T={T}, up to {args.repeats} repeats (load {load_avg()})")
            r = ibp_ratio(graph, x, args.repeats, args.ibp_budget, args.device)
            rows.append(_ibp_row(LABELS[key], T, r))
            results.setdefault("ibp", []).append({"model": key, "T": T, **r})
            log(f"  forward {r['forward_s']:.3f}s, IBP {r['ibp_s']:.3f}s, ratio {r['ratio']:.1f}")
            blk = graph.block_graph("layer0")
            xb = evaluate(graph, x, upto=blk.input)
            rb = ibp_ratio(blk, xb, args.repeats, args.ibp_budget, args.device, breakdown=j == len(args.ibp_T) - 1)
            brows.append(_ibp_row(LABELS[key] + ", layer0", T, rb))
            results.setdefault("ibp_block", []).append({"model": key, "T": T, **rb})
            if rb["breakdown"]:
                crumbs.append((key, T, rb["breakdown"]))
            log(f"  layer0: forward {rb['forward_s']:.4f}s, IBP {rb['ibp_s']:.4f}s, ratio {rb['ratio']:.1f}")
            del graph, blk
        del m
    head = ["model", "T", "nodes (bounded)", "N", "forward s (median)", "IBP s (median)", "IBP / forward",
            "pairs", "<= 4?", "load avg after"]
    out += table(head, rows)
    out += ["", "One bounded block (the first block's subgraph at its nominal input; every node bounded):", ""]
    out += table(head, brows)
    out += threads_table(args, results)
    out += ["", "Where the bounded block's IBP time goes (its last IBP run at the largest T, split per op type by "
            "wrapping the engine's per-node interval rule and float32 margin; largest first):", ""]
    for key, T, b in crumbs:
        ops = sorted(b["ops"].items(), key=lambda kv: -(kv[1][1] + kv[1][2]))
        rows = [[op, n, fmt_s(r), fmt_s(mg), f"{100 * (r + mg) / b['total']:.0f}%"] for op, (n, r, mg) in ops[:6]]
        out += [f"{LABELS[key]}, layer0, T={T}: total {fmt_s(b['total'])} s", ""]
        out += table(["op", "nodes", "rule s", "margin s", "share"], rows) + [""]
    out += [f"Section time: {fmt_s(time.perf_counter() - t_sec)} s.", ""]

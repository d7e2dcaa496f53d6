"""gamma.progress: the time estimates are exact under their own cost model, and absent too early."""

from __future__ import annotations

import pytest

import gamma

from gamma.graph import Graph
from gamma.progress import BoundsEstimate, CountEstimate, duration, remaining


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _chain(n: int) -> Graph:
    g = Graph("chain", "x", (2,))
    prev = "x"
    for i in range(n):
        prev = g.add(f"n{i}", "relu", prev)
    return g


def test_duration_text():
    assert [duration(s) for s in (0, 44.6, 60, 190, 3599, 7500)] == ["0s", "45s", "1m00s", "3m10s", "59m59s",
                                                                      "2h05m"]


def test_no_estimate_too_early_or_when_done():
    assert remaining(100.0, 0.01) is None       # under 5% of the work
    assert remaining(1.0, 0.5) is None          # under 2 s
    assert remaining(10.0, 1.0) is None
    assert remaining(10.0, 0.25) == pytest.approx(30.0)


def test_bounds_estimate_is_exact_when_node_i_costs_i():
    """The model: CROWN from the i-th node back-substitutes through i nodes.  A clock
    that charges exactly i units for node i must get the true time left at every node."""
    n = 40
    clock, seen = Clock(), []
    est = BoundsEstimate(seen.append, _chain(n), "difference", clock=clock)
    for i in range(1, n + 1):
        est(f"crown n{i - 1}")
        done = (i - 1) * i / 2
        truth = n * (n + 1) / 2 - done
        left = remaining(done, est.fraction(i))
        if left is not None:
            assert left == pytest.approx(truth)
            assert seen[-1] == f"difference: node {i}/{n} n{i - 1}, about {duration(truth)} left"
        else:
            assert seen[-1] == f"difference: node {i}/{n} n{i - 1}"
        clock.t += i
    assert sum("left" in m for m in seen) > n // 2
    est("alpha 3/20: width sum 1.5")                          # other engine messages pass through
    assert seen[-1] == "difference: alpha 3/20: width sum 1.5"


def test_count_estimate_from_mean_task_time():
    clock, seen = Clock(), []
    est = CountEstimate(seen.append, 4, clock=clock)
    tags = []
    for j, name in enumerate(["layer0", "layer1", "layer2", "layer3"]):
        tags.append(est.start(j, name))
        clock.t += 30.0
    assert tags == ["block 1/4 layer0", "block 2/4 layer1", "block 3/4 layer2", "block 4/4 layer3"]
    assert seen == ["block 1/4 layer0", "block 2/4 layer1, about 1m30s left", "block 3/4 layer2, about 1m00s left",
                    "block 4/4 layer3, about 30s left"]


def test_whole_network_progress_counts_nodes(whisper_hf_dir):
    """A whole-network run reports 'bounds: node i/N NAME' as CROWN reaches each node
    (with the time left once an estimate is possible, gamma.progress)."""
    seen = []
    gamma.verify(gamma.load(whisper_hf_dir[0]), 1e-3, "crown", seq_len=4, progress=seen.append)
    nodes = [m for m in seen if m.startswith("bounds: node ")]
    assert nodes and all("/" in m.split()[2] for m in nodes)
    i, n = nodes[-1].split()[2].split("/")
    assert int(i) <= int(n)


def test_bounds_estimate_says_where_the_bounds_saturated():
    """Once the engine reports the first saturated node, the estimate says so at once and in
    every later line (a user watching a long whole-model run can stop it, or rerun with
    --after-saturation ibp); under that option it says that interval bounds take over."""
    clock, seen = Clock(), []
    est = BoundsEstimate(seen.append, _chain(4), "bounds", clock=clock)
    est("crown n0")
    est("saturated n1")
    assert seen[-1] == ("bounds: n1 saturated: the bounds after it will come from caps (--after-saturation ibp "
                        "would finish from here)")
    est("crown n3")
    assert seen[-1] == "bounds: node 4/4 n3, saturated from n1"
    est = BoundsEstimate(seen.append, _chain(4), "bounds", clock=clock)
    est("ibp-from n2")
    assert seen[-1] == "bounds: n2 saturated: interval bounds from here (--after-saturation ibp)"


def test_engine_reports_the_first_saturated_node_once(llama_hf_dir, monkeypatch):
    """compute_bounds tells its progress callback about the first node wider than the threshold
    (1e6; lowered here to reach it on the tiny model, whose norms cap every node below 1e6) or
    unbounded, once, and nothing when no node saturates."""
    from gamma.bounds import compute_bounds, engine
    from gamma.bounds.engine import saturated
    monkeypatch.setattr(engine, "SATURATION_WIDTH", 5e3)
    m = gamma.load(llama_hf_dir[0])
    g, x = m.graph(seq_len=2), m.input_point(seq_len=2).x
    seen = []
    r = compute_bounds(g, x, 30.0, "crown", progress=seen.append)
    first = next(n.name for n in g if n.op != "input" and saturated(r.nodes[n.name]))
    assert [s for s in seen if not s.startswith("crown ")] == [f"saturated {first}"]
    seen.clear()
    compute_bounds(g, x, 1e-3, "crown", progress=seen.append)
    assert seen and all(s.startswith("crown ") for s in seen)

"""gamma.vnnspec: standard VNN-LIB (unsafe-region semantics), exact errors."""

from __future__ import annotations

import gzip
import os

import pytest
import torch

from gamma.errors import GammaError
from gamma.vnnspec import parse_vnnlib

VIT_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "benchmarks", "vnncomp2023-vit")

HEAD = "\n".join([f"(declare-const X_{i} Real)" for i in range(2)] + [f"(declare-const Y_{i} Real)" for i in range(3)])
BOX = """
(assert (<= X_0 1.5)) (assert (>= X_0 -0.5))
(assert (<= X_1 2))
(assert (>= X_1 1))
"""


def _write(tmp_path, body: str, name: str = "p.vnnlib", head: str = HEAD) -> str:
    p = tmp_path / name
    p.write_text(head + "\n" + body + "\n")
    return str(p)


def test_box_and_disjunction_of_conjunctions(tmp_path):
    path = _write(tmp_path, BOX + """
; unsafe: Y_1 beats Y_0, or (Y_2 >= Y_0 and Y_2 <= 3)
(assert (or (and (>= Y_1 Y_0))
            (and (>= Y_2 Y_0) (<= Y_2 3))))""")
    spec = parse_vnnlib(path)
    assert (spec.n_inputs, spec.n_outputs, len(spec.regions)) == (2, 3, 1)
    r = spec.regions[0]
    assert r.lower.tolist() == [-0.5, 1.0] and r.upper.tolist() == [1.5, 2.0]
    rows = {tuple(c.tolist()) + (float(d),) for c, d in zip(r.C, r.d)}
    # each row: c . Y + d <= 0 is the unsafe condition
    assert rows == {(1.0, -1.0, 0.0, 0.0), (1.0, 0.0, -1.0, 0.0), (0.0, 0.0, 1.0, -3.0)}
    assert sorted(len(c) for c in r.cases) == [1, 2]
    y = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)      # Y_1 > Y_0: the first case holds
    unsafe = [bool((r.C[c] @ y + r.d[c] <= 0).all()) for c in r.cases]
    assert unsafe[[len(c) for c in r.cases].index(1)]


def test_linear_terms_and_gzip(tmp_path):
    body = BOX + "(assert (<= (+ Y_0 (* -2 Y_1) (- 1)) (* 0.5 Y_2)))"
    p = tmp_path / "p.vnnlib.gz"
    p.write_bytes(gzip.compress((HEAD + "\n" + body + "\n").encode()))
    r = parse_vnnlib(str(p)).regions[0]
    assert r.C.tolist() == [[1.0, -2.0, -0.5]] and r.d.tolist() == [-1.0]


def test_input_cases_make_regions(tmp_path):
    body = """(assert (or (and (>= X_0 0) (<= X_0 1) (>= X_1 0) (<= X_1 1) (>= Y_0 Y_1))
                 (and (>= X_0 2) (<= X_0 3) (>= X_1 0) (<= X_1 1) (>= Y_0 Y_2))))"""
    spec = parse_vnnlib(_write(tmp_path, body))
    assert [r.lower.tolist() for r in spec.regions] == [[0.0, 0.0], [2.0, 0.0]]
    assert spec.n_cases == 2


@pytest.mark.skipif(not os.path.isdir(VIT_DIR), reason=f"vit benchmark folder {VIT_DIR} is missing")
def test_vit_property():
    spec = parse_vnnlib(os.path.join(VIT_DIR, "vnnlib", "ibp_3_3_8_1140.vnnlib.gz"))
    assert (spec.n_inputs, spec.n_outputs, spec.n_cases) == (3072, 10, 9)
    r = spec.regions[0]
    assert bool((r.upper > r.lower).all())
    assert bool((r.C[:, 6] == 1).all())                      # "Y_j >= Y_6": unsafe where the label loses


@pytest.mark.parametrize("body,message", [
    ("(assert (<= X_0 1)", "P:6: '(' is never closed"),
    (BOX + "(assert (<= Y_0 1)))", "P:10: unbalanced ')'"),
    (BOX + "(assert (<= Y_7 1))", "P:10: Y_7 is not declared"),
    (BOX + "(assert (=> Y_0 1))", "P:10: unsupported formula operator '=>'"),
    (BOX + "(assert (<= (* Y_0 Y_1) 1))", "P:10: product of two variables (only linear terms are supported)"),
    (BOX + "(assert (<= Y_0 foo))", "P:10: unknown symbol 'foo'"),
    (BOX + "(check-sat)", "P:10: unsupported command 'check-sat'"),
    (BOX + "(assert (<= X_0 Y_0))", "P:10: a constraint mixes input and output variables"),
    ("(assert (<= X_0 1)) (assert (>= X_0 0)) (assert (<= Y_0 1))", "P: X_1 is not bounded on both sides"),
    ("", "P: no assertions"),
])
def test_errors_are_one_line_with_exact_messages(tmp_path, body, message):
    path = _write(tmp_path, body)
    with pytest.raises(GammaError) as e:
        parse_vnnlib(path)
    assert str(e.value) == message.replace("P", path, 1)


def test_missing_declaration(tmp_path):
    path = _write(tmp_path, BOX, head="(declare-const X_0 Real)\n(declare-const X_1 Real)\n(declare-const Y_1 Real)")
    with pytest.raises(GammaError, match=r"Y_0 is not declared \(variables must be Y_0 \.\. Y_1\)$"):
        parse_vnnlib(path)

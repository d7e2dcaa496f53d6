"""Standard VNN-LIB properties (``gamma verify MODEL.onnx --vnnlib FILE``).

VNN-LIB (the format of VNN-COMP) declares the flattened input ``X_0 ..
X_{n-1}`` and output ``Y_0 .. Y_{m-1}`` of a network as real constants and
asserts constraints on them.  The conjunction of all assertions describes
the **unsafe region**: a property is violated (``sat``) iff some input
satisfies every assertion, and holds (``unsat``) iff none does.  (This is
the opposite of ``--property``, whose assertions state what must hold.)

Supported: ``declare-const`` of ``X_i`` / ``Y_i`` (type ``Real``),
``assert`` of formulas built from ``and``, ``or`` and comparisons ``<=``,
``>=``, ``<``, ``>``, ``=`` between linear terms (numbers, variables,
``+``, ``-``, ``*`` by a number); ``;`` comments; gzip files.  Strict and
non-strict comparisons are treated alike (a sound choice for ``unsat``:
the closed region contains the open one).

The formula is brought to disjunctive normal form.  In each case,
constraints on a single input variable give the input box, and
constraints on outputs are kept as rows ``c . Y + d <= 0`` (the case is
unsafe where all of its rows hold).  Cases with the same box share one
:class:`Region`.  Errors are one line: ``PATH:LINE: message``.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Union

import torch

from .errors import GammaError
from .io.onnx_load import read_bytes       # the same file checks and messages as an ONNX file's

MAX_CASES = 100_000              # disjunctive normal form larger than this is refused
_TOKEN = re.compile(r"\(|\)|[^\s()]+")
_VAR = re.compile(r"^([XY])_(\d+)$")


@dataclass
class Region:
    """One input box and the unsafe cases over it.

    ``lower``, ``upper``: (n_inputs,) float64; ``C`` (K, n_outputs), ``d`` (K,):
    the output rows; ``cases``: per case the row indices that must all hold
    (``C[k] . Y + d[k] <= 0``) for an output to be unsafe (an empty case:
    every input of the box is unsafe)."""
    lower: torch.Tensor
    upper: torch.Tensor
    C: torch.Tensor
    d: torch.Tensor
    cases: list = field(default_factory=list)


@dataclass
class Spec:
    path: str
    n_inputs: int
    n_outputs: int
    regions: list

    def check_sizes(self, n_inputs: int, n_outputs: int, model: str) -> None:
        """Declared variables against the model's flattened input / output sizes."""
        if self.n_inputs != n_inputs:
            raise GammaError(f"{self.path}: the property declares {self.n_inputs} input variables but "
                             f"{model} has {n_inputs} input values")
        if self.n_outputs != n_outputs:
            raise GammaError(f"{self.path}: the property declares {self.n_outputs} output variables but "
                             f"{model} has {n_outputs} output values")

    @property
    def n_cases(self) -> int:
        return sum(len(r.cases) for r in self.regions)


# ---------------------------------------------------------------- s-expressions
class _List(list):
    line = 0


def _read_text(path: str) -> str:
    """The file's text (gunzipped when it starts with the gzip magic): :func:`gamma.io.onnx_load.read_bytes`."""
    try:
        return read_bytes(path).decode("utf-8")
    except UnicodeDecodeError:
        raise GammaError(f"{path}: not a text file (invalid UTF-8)") from None


def _parse_sexprs(text: str, path: str) -> list:
    """Top-level s-expressions as nested lists of strings (each list knows its line)."""
    stack: list = [_List()]
    for n, raw in enumerate(text.splitlines(), 1):
        for tok in _TOKEN.findall(raw.split(";", 1)[0]):
            if tok == "(":
                lst = _List()
                lst.line = n
                stack[-1].append(lst)
                stack.append(lst)
            elif tok == ")":
                if len(stack) == 1:
                    raise GammaError(f"{path}:{n}: unbalanced ')'")
                stack.pop()
            else:
                if len(stack) == 1:
                    raise GammaError(f"{path}:{n}: '{tok}' outside parentheses")
                stack[-1].append(tok)
    if len(stack) > 1:
        raise GammaError(f"{path}:{stack[-1].line}: '(' is never closed")
    return stack[0]


# ---------------------------------------------------------------- formulas
class _Parser:
    def __init__(self, path: str):
        self.path = path
        self.declared = {"X": set(), "Y": set()}

    def err(self, node, msg: str) -> GammaError:
        return GammaError(f"{self.path}:{getattr(node, 'line', 0)}: {msg}")

    def declare(self, e) -> None:
        if len(e) != 3 or not isinstance(e[1], str) or e[2] != "Real":
            raise self.err(e, "expected (declare-const NAME Real)")
        m = _VAR.match(e[1])
        if not m:
            raise self.err(e, f"unsupported variable name '{e[1]}' (expected X_i or Y_i)")
        self.declared[m.group(1)].add(int(m.group(2)))

    def term(self, e, parent) -> tuple:
        """A linear term as ({(kind, index): coef}, const)."""
        if isinstance(e, str):
            m = _VAR.match(e)
            if m:
                kind, i = m.group(1), int(m.group(2))
                if i not in self.declared[kind]:
                    raise self.err(parent, f"{e} is not declared")
                return {(kind, i): 1.0}, 0.0
            try:
                v = float(e)
            except ValueError:
                raise self.err(parent, f"unknown symbol '{e}'") from None
            if not math.isfinite(v):
                raise self.err(parent, f"number '{e}' is not finite")
            return {}, v
        if not e or not isinstance(e[0], str):
            raise self.err(e, "expected a term")
        op, args = e[0], [self.term(a, e) for a in e[1:]]
        if op == "+" and args:
            return _lin_sum(args, [1.0] * len(args))
        if op == "-" and len(args) == 1:
            return _lin_sum(args, [-1.0])
        if op == "-" and len(args) >= 2:
            return _lin_sum(args, [1.0] + [-1.0] * (len(args) - 1))
        if op == "*" and len(args) == 2:
            (ca, a), (cb, b) = args
            if ca and cb:
                raise self.err(e, "product of two variables (only linear terms are supported)")
            k, t = (a, (cb, b)) if not ca else (b, (ca, a))
            return {v: k * c for v, c in t[0].items()}, k * t[1]
        raise self.err(e, f"unsupported term operator '{op}'")

    def formula(self, e, parent) -> list:
        """Disjunctive normal form: a list of cases, each a list of atoms (expr <= 0, line)."""
        if isinstance(e, str) or not e or not isinstance(e[0], str):
            raise self.err(parent if isinstance(e, str) or not e else e, "expected a formula")
        op = e[0]
        if op == "and":
            cases = [[]]
            for sub in e[1:]:
                cases = _cross(cases, self.formula(sub, e), self, e)
            return cases
        if op == "or":
            out = []
            for sub in e[1:]:
                out += self.formula(sub, e)
            if len(out) > MAX_CASES:
                raise self.err(e, f"more than {MAX_CASES} cases in disjunctive normal form")
            return out
        if op in ("<=", ">=", "<", ">", "="):
            if len(e) != 3:
                raise self.err(e, f"'{op}' takes two terms")
            a, b = self.term(e[1], e), self.term(e[2], e)
            le = _lin_sum([a, b], [1.0, -1.0])           # a - b
            ge = _lin_sum([a, b], [-1.0, 1.0])           # b - a
            atoms = {"<=": [le], "<": [le], ">=": [ge], ">": [ge], "=": [le, ge]}[op]
            return [[(*atom, e.line) for atom in atoms]]
        raise self.err(e, f"unsupported formula operator '{op}'")


def _lin_sum(terms, ks) -> tuple:
    coef: dict = {}
    const = 0.0
    for (c, d), k in zip(terms, ks):
        for v, x in c.items():
            coef[v] = coef.get(v, 0.0) + k * x
        const += k * d
    return {v: x for v, x in coef.items() if x != 0.0}, const


def _cross(a: list, b: list, parser, where) -> list:
    if len(a) * len(b) > MAX_CASES:
        raise parser.err(where, f"more than {MAX_CASES} cases in disjunctive normal form")
    if len(b) == 1:
        return [ca + b[0] for ca in a]
    return [ca + cb for ca in a for cb in b]


# ---------------------------------------------------------------- the property
def parse_vnnlib(path: Union[str, os.PathLike]) -> Spec:
    """Parse a standard VNN-LIB file (plain or gzip) into a :class:`Spec`."""
    path = os.fspath(path)
    p = _Parser(path)
    common: list = []               # atoms of assertions with a single case (most of them)
    cases = [[]]
    for e in _parse_sexprs(_read_text(path), path):
        if not e or not isinstance(e[0], str):
            raise p.err(e, "expected a command")
        if e[0] == "declare-const":
            p.declare(e)
        elif e[0] == "assert":
            if len(e) != 2:
                raise p.err(e, "assert takes one formula")
            dnf = p.formula(e[1], e)
            if len(dnf) == 1:
                common += dnf[0]
            else:
                cases = _cross(cases, dnf, p, e)
        else:
            raise p.err(e, f"unsupported command '{e[0]}'")
    n_in, n_out = _count(p, "X", path), _count(p, "Y", path)
    if not common and cases == [[]]:
        raise GammaError(f"{path}: no assertions")
    return Spec(path, n_in, n_out, _regions(p, common, cases, n_in, n_out))


def _count(p: _Parser, kind: str, path: str) -> int:
    ids = p.declared[kind]
    if not ids:
        raise GammaError(f"{path}: no {kind}_i variables are declared")
    n = max(ids) + 1
    if len(ids) != n:
        missing = min(set(range(n)) - ids)
        raise GammaError(f"{path}: {kind}_{missing} is not declared (variables must be {kind}_0 .. {kind}_{n - 1})")
    return n


def _regions(p: _Parser, common: list, cases: list, n_in: int, n_out: int) -> list:
    boxes: dict = {}
    for case in cases:
        lo, hi = [-math.inf] * n_in, [math.inf] * n_in
        rows, feasible = [], True
        for coef, const, line in common + case:
            kinds = {k for k, _ in coef}
            if not kinds:                                   # a constant comparison
                feasible &= const <= 0
            elif kinds == {"X"}:
                if len(coef) != 1:
                    raise GammaError(f"{p.path}:{line}: constraints on inputs must bound one variable "
                                     "(linear constraints between inputs are not supported)")
                ((_, i), c), = coef.items()
                v = -const / c
                if c > 0:
                    hi[i] = min(hi[i], v)
                else:
                    lo[i] = max(lo[i], v)
            elif kinds == {"Y"}:
                rows.append((coef, const))
            else:
                raise GammaError(f"{p.path}:{line}: a constraint mixes input and output variables")
        if not feasible or any(a > b for a, b in zip(lo, hi)):
            continue                                        # an empty case: nothing unsafe there
        free = [i for i in range(n_in) if not (math.isfinite(lo[i]) and math.isfinite(hi[i]))]
        if free:
            raise GammaError(f"{p.path}: X_{free[0]} is not bounded on both sides")
        key = (tuple(lo), tuple(hi))
        boxes.setdefault(key, (lo, hi, []))[2].append(rows)
    out = []
    for lo, hi, case_rows in boxes.values():
        index: dict = {}
        C, d, idx_cases = [], [], []
        for rows in case_rows:
            ids = []
            for coef, const in rows:
                key = (tuple(sorted(coef.items())), const)
                if key not in index:
                    index[key] = len(C)
                    c = torch.zeros(n_out, dtype=torch.float64)
                    for (_, j), v in coef.items():
                        c[j] = v
                    C.append(c)
                    d.append(const)
                ids.append(index[key])
            idx_cases.append(sorted(set(ids)))
        Cm = torch.stack(C) if C else torch.zeros(0, n_out, dtype=torch.float64)
        out.append(Region(torch.tensor(lo, dtype=torch.float64), torch.tensor(hi, dtype=torch.float64), Cm, torch.tensor(d, dtype=torch.float64), idx_cases))
    return out

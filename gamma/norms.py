"""Weight norms per tensor and per block: Frobenius and spectral (largest singular value).

Every weight tensor with two or more dimensions is read as a matrix (a conv
weight ``(out, in, k)`` as ``(out, in * k)``; note that this is the norm of the
reshaped kernel, not the operator norm of the convolution).  1-D tensors
(norm scales, biases) are not matrices and are left out.

Spectral norms are computed in float64:

* ``svd``: exact singular values (``torch.linalg.svdvals``) when the matrix has
  at most ``exact_limit ** 2`` entries (default 4096**2, i.e. every matrix
  whose two sides are both <= 4096 and more).  ``rel_error_bound`` is the
  usual backward-error bound of a float64 SVD, ``max(m, n) * 2**-52``.
* ``power``: Lanczos on ``W^T W`` over the smaller side, with full
  reorthogonalisation, from a seeded random start, until the bound below is
  within ``rtol`` (default 1e-6).  The reported value ``s = ||W u||`` for the
  unit Ritz vector ``u`` is a rigorous lower bound of the spectral norm.  The
  Ritz residual ``rho = ||W^T W u - theta u||`` puts an eigenvalue of ``W^T W``
  within ``rho`` of ``theta`` (Krylov-Bogoliubov); taking that eigenvalue to
  be the largest one (what Lanczos from a random start converges to first:
  the "-ish" of the rule) gives ``sigma_max <= sqrt(theta + rho)`` and
  ``rel_error_bound = sqrt(theta + rho) / s - 1`` (+ rounding).

Blocks gather their matrices through :data:`PART_TABLES`, keyed by canonical
tensor name patterns per architecture, never by substring matching.
Nothing here prints; :func:`weight_norms` returns plain data.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from .io.checkpoint import LoadedCheckpoint
from .errors import GammaError

DEFAULT_EXACT_LIMIT = 4096
DEFAULT_RTOL = 1e-6
MAX_LANCZOS_ITERS = 1000
MIN_LANCZOS_ITERS = 50      # see lanczos_spectral: makes a missed top eigenvalue improbable
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")   # source types that were not quantized
EPS64 = float(np.finfo(np.float64).eps)

# --------------------------------------------------------------------------
# canonical name pattern -> (component, part).  ``{i}`` is the layer index.
LM_PARTS = {
    "model.layers.{i}.self_attn.q_proj.weight": ("decoder", "attn_q"),
    "model.layers.{i}.self_attn.k_proj.weight": ("decoder", "attn_k"),
    "model.layers.{i}.self_attn.v_proj.weight": ("decoder", "attn_v"),
    "model.layers.{i}.self_attn.o_proj.weight": ("decoder", "attn_o"),
    "model.layers.{i}.mlp.gate_proj.weight": ("decoder", "mlp_gate"),
    "model.layers.{i}.mlp.up_proj.weight": ("decoder", "mlp_up"),
    "model.layers.{i}.mlp.down_proj.weight": ("decoder", "mlp_down"),
}
WHISPER_PARTS = {
    "model.encoder.layers.{i}.self_attn.q_proj.weight": ("encoder", "attn_q"),
    "model.encoder.layers.{i}.self_attn.k_proj.weight": ("encoder", "attn_k"),
    "model.encoder.layers.{i}.self_attn.v_proj.weight": ("encoder", "attn_v"),
    "model.encoder.layers.{i}.self_attn.out_proj.weight": ("encoder", "attn_o"),
    "model.encoder.layers.{i}.fc1.weight": ("encoder", "mlp_fc1"),
    "model.encoder.layers.{i}.fc2.weight": ("encoder", "mlp_fc2"),
    "model.decoder.layers.{i}.self_attn.q_proj.weight": ("decoder", "attn_q"),
    "model.decoder.layers.{i}.self_attn.k_proj.weight": ("decoder", "attn_k"),
    "model.decoder.layers.{i}.self_attn.v_proj.weight": ("decoder", "attn_v"),
    "model.decoder.layers.{i}.self_attn.out_proj.weight": ("decoder", "attn_o"),
    "model.decoder.layers.{i}.encoder_attn.q_proj.weight": ("decoder", "cross_q"),
    "model.decoder.layers.{i}.encoder_attn.k_proj.weight": ("decoder", "cross_k"),
    "model.decoder.layers.{i}.encoder_attn.v_proj.weight": ("decoder", "cross_v"),
    "model.decoder.layers.{i}.encoder_attn.out_proj.weight": ("decoder", "cross_o"),
    "model.decoder.layers.{i}.fc1.weight": ("decoder", "mlp_fc1"),
    "model.decoder.layers.{i}.fc2.weight": ("decoder", "mlp_fc2"),
}
PART_TABLES = {"llama": LM_PARTS, "qwen3": LM_PARTS, "whisper": WHISPER_PARTS}
COMPONENT_ORDER = ("encoder", "decoder")


class PartTable:
    """A compiled part table: ``lookup(name) -> (component, index, part)`` or None."""

    def __init__(self, table: dict[str, tuple[str, str]]):
        self._rows = []
        for pattern, (component, part) in table.items():
            rx = r"(\d+)".join(re.escape(s) for s in pattern.split("{i}"))
            self._rows.append((re.compile(rx + r"\Z"), component, part))
        # parts of a block per component, in table order (the column order of reports)
        self.parts: dict[str, list[str]] = {}
        for component, part in table.values():
            self.parts.setdefault(component, []).append(part)

    def lookup(self, name: str) -> Optional[tuple[str, int, str]]:
        for rx, component, part in self._rows:
            m = rx.match(name)
            if m:
                return component, int(m.group(1)), part
        return None


def part_table(arch: str) -> PartTable:
    if arch not in PART_TABLES:
        raise GammaError(f"no weight part table for architecture '{arch}'")
    return PartTable(PART_TABLES[arch])


def block_name(arch: str, component: str, index: int) -> str:
    """``layer3`` for decoder LMs (as in verify reports), ``encoder.layer3`` for Whisper."""
    return f"{component}.layer{index}" if arch == "whisper" else f"layer{index}"


# --------------------------------------------------------------------------
@dataclass
class Spectral:
    value: float              # svd: the largest singular value; power: a lower bound of it
    method: str               # "svd" | "power"
    rel_error_bound: float    # true value in [value, value * (1 + rel_error_bound)] (svd: +-)
    iterations: int = 0


def as_matrix(t: torch.Tensor) -> Optional[torch.Tensor]:
    """(rows, cols) float64 view of a weight; None for 0-D/1-D tensors."""
    if t.dim() < 2:
        return None
    return t.detach().reshape(t.shape[0], -1).to(torch.float64)


def spectral_norm(w: torch.Tensor, exact_limit: int = DEFAULT_EXACT_LIMIT, rtol: float = DEFAULT_RTOL,
                  max_iter: int = MAX_LANCZOS_ITERS, seed: int = 0) -> Spectral:
    """Largest singular value of a 2-D ``w`` (float64 inside): exact SVD when
    ``w.numel() <= exact_limit**2``, else Lanczos to ``rtol`` (see module doc)."""
    if w.dim() != 2:
        raise ValueError(f"spectral_norm needs a matrix, got shape {tuple(w.shape)}")
    w = w.to(torch.float64)
    m, n = w.shape
    if m == 0 or n == 0:
        return Spectral(0.0, "svd", 0.0)
    if w.numel() <= exact_limit * exact_limit:
        return Spectral(float(torch.linalg.svdvals(w)[0]), "svd", max(m, n) * EPS64)
    return lanczos_spectral(w, rtol, max_iter, seed)


def lanczos_spectral(w: torch.Tensor, rtol: float = DEFAULT_RTOL, max_iter: int = MAX_LANCZOS_ITERS,
                     seed: int = 0) -> Spectral:
    """Lanczos on ``A = W^T W`` (n x n, n the smaller side of ``w``), float64.

    Runs at least ``min(n, MIN_LANCZOS_ITERS)`` steps before it may stop: by
    Kuczynski and Wozniakowski (1992), k Lanczos steps from a random start
    underestimate the top eigenvalue by more than a factor (1 - e) with
    probability <= 1.648 sqrt(n) exp(-sqrt(e) (2k - 1)); for k = 50, n = 4096
    and e = 0.02 (1 % on the singular value) that is below 1e-4, whatever the
    spectral gap."""
    w = w.to(torch.float64)
    if w.shape[1] > w.shape[0]:
        w = w.T                                   # (m, n) with n <= m
    m, n = w.shape
    floor = 4 * m * EPS64                         # rounding in the mat-vecs
    k_max = min(n, max_iter)
    gen = torch.Generator().manual_seed(seed)
    Q = torch.empty(k_max + 1, n, dtype=torch.float64)       # Lanczos vectors, rows
    q = torch.randn(n, generator=gen, dtype=torch.float64)
    Q[0] = q / q.norm()
    alphas: list[float] = []
    betas: list[float] = []
    best = Spectral(0.0, "power", math.inf, 0)
    for k in range(k_max):
        v = w.T @ (w @ Q[k])                                  # A q_k, (n,)
        a = float(Q[k] @ v)
        v -= a * Q[k]
        if k:
            v -= betas[-1] * Q[k - 1]
        for _ in range(2):                                    # full reorthogonalisation, twice
            v -= Q[:k + 1].T @ (Q[:k + 1] @ v)
        b = float(v.norm())
        alphas.append(a)
        betas.append(b)
        last = k == k_max - 1
        if (k + 1 >= min(n, MIN_LANCZOS_ITERS) and (k % 5 == 4 or k < 60)) or last or b == 0.0:
            best = _ritz_bound(w, Q[:k + 1], alphas, betas, floor, k + 1)
            if best.rel_error_bound <= rtol:
                return best
        if b == 0.0 or last:
            break
        Q[k + 1] = v / b
    return best


def _ritz_bound(w: torch.Tensor, Qk: torch.Tensor, alphas: list[float], betas: list[float], floor: float,
                iters: int) -> Spectral:
    k = len(alphas)
    T = np.diag(alphas) + np.diag(betas[:-1], 1) + np.diag(betas[:-1], -1)    # (k, k) tridiagonal
    evals, evecs = np.linalg.eigh(T)
    theta, y = float(evals[-1]), evecs[:, -1]
    rho = abs(betas[-1] * y[-1])                              # ||A u - theta u||
    u = Qk.T @ torch.from_numpy(np.ascontiguousarray(y))
    u = u / u.norm()
    lo = float((w @ u).norm())                                # ||W u|| <= sigma_max for unit u
    if lo == 0.0:
        return Spectral(0.0, "power", 0.0 if theta <= 0 and rho == 0 else math.inf, iters)
    hi = math.sqrt(max(theta, 0.0) + rho)
    return Spectral(lo, "power", max(hi / lo - 1.0, 0.0) + floor, iters)


def frobenius(w: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(w.to(torch.float64)))


# --------------------------------------------------------------------------
def _is_quantized(dtype: Optional[str]) -> bool:
    return dtype is not None and dtype not in FLOAT_DTYPES


def tensor_norms(ckpt: LoadedCheckpoint, exact_limit: int = DEFAULT_EXACT_LIMIT, rtol: float = DEFAULT_RTOL,
                 progress: Optional[Callable[[str], None]] = None,
                 components: Optional[Sequence[str]] = None) -> list[dict]:
    """One record per matrix (>= 2-D tensor), in checkpoint order.  Tied tensors
    (one object under two names) are computed once; the second names the first
    in ``tied_to``.  ``components``: only the block matrices of these components."""
    table = part_table(ckpt.config.arch)
    seen: dict[int, dict] = {}
    out = []
    matrices = []
    for name, t in ckpt.tensors.items():
        where = table.lookup(name)
        if t.dim() >= 2 and (components is None or (where is not None and where[0] in components)):
            matrices.append((name, t, where))
    for j, (name, t, where) in enumerate(matrices):
        rec: dict = {"name": name, "shape": list(t.shape), "source_dtype": ckpt.dtypes.get(name),
                     "component": where[0] if where else None, "index": where[1] if where else None,
                     "part": where[2] if where else None}
        first = seen.get(id(t))
        if first is not None:
            rec.update({k: first[k] for k in ("frobenius", "spectral", "method", "rel_error_bound", "iterations")})
            rec["tied_to"] = first["name"]
        else:
            if progress:
                progress(f"norms {j + 1}/{len(matrices)} {name}")
            w = as_matrix(t)
            s = spectral_norm(w, exact_limit, rtol)
            rec.update({"frobenius": frobenius(w), "spectral": s.value, "method": s.method,
                        "rel_error_bound": s.rel_error_bound, "iterations": s.iterations})
            rec["tied_to"] = None
            seen[id(t)] = rec
        out.append(rec)
    return out


def block_norms(arch: str, tensors: list[dict]) -> list[dict]:
    """Per block (component, index): ``<part>_frobenius``/``<part>_spectral`` for
    every part, ``total_frobenius`` (root of the sum of squares over the block's
    matrices) and ``max_spectral`` (and which part has it)."""
    table = part_table(arch)
    groups: dict[tuple[str, int], dict[str, dict]] = {}
    for rec in tensors:
        if rec["part"] is not None:
            groups.setdefault((rec["component"], rec["index"]), {})[rec["part"]] = rec
    rows = []
    for (component, index) in sorted(groups, key=lambda ci: (COMPONENT_ORDER.index(ci[0]), ci[1])):
        parts = groups[(component, index)]
        row: dict = {"component": component, "index": index, "name": block_name(arch, component, index)}
        for part in table.parts[component]:
            rec = parts.get(part)
            row[f"{part}_frobenius"] = rec["frobenius"] if rec else None
            row[f"{part}_spectral"] = rec["spectral"] if rec else None
        row["total_frobenius"] = math.sqrt(sum(r["frobenius"] ** 2 for r in parts.values()))
        top = max(parts.values(), key=lambda r: r["spectral"])
        row["max_spectral"] = top["spectral"]
        row["max_spectral_part"] = top["part"]
        rows.append(row)
    return rows


def _range(hi: float, lo: float) -> Optional[float]:
    return hi / lo if lo > 0 else None


def summarize(blocks: list[dict]) -> dict:
    """Max/min total Frobenius and max spectral over blocks, with their ranges (max/min)."""
    if not blocks:
        return {"num_blocks": 0}
    fro = sorted(blocks, key=lambda b: b["total_frobenius"])
    spec = sorted(blocks, key=lambda b: b["max_spectral"])
    return {
        "num_blocks": len(blocks),
        "max_total_frobenius": fro[-1]["total_frobenius"], "max_total_frobenius_block": fro[-1]["name"],
        "min_total_frobenius": fro[0]["total_frobenius"], "min_total_frobenius_block": fro[0]["name"],
        "total_frobenius_range": _range(fro[-1]["total_frobenius"], fro[0]["total_frobenius"]),
        "max_spectral": spec[-1]["max_spectral"], "max_spectral_block": spec[-1]["name"],
        "min_spectral": spec[0]["max_spectral"], "min_spectral_block": spec[0]["name"],
        "spectral_range": _range(spec[-1]["max_spectral"], spec[0]["max_spectral"]),
    }


def _notes(ckpt: LoadedCheckpoint, tensors: list[dict], rtol: float) -> list[str]:
    notes = []
    quant: dict[str, int] = {}
    for rec in tensors:
        if rec["tied_to"] is None and _is_quantized(rec["source_dtype"]):
            quant[rec["source_dtype"]] = quant.get(rec["source_dtype"], 0) + 1
    if quant:
        kinds = ", ".join(f"{k} x{v}" for k, v in sorted(quant.items(), key=lambda kv: (-kv[1], kv[0])))
        notes.append(f"weights were dequantized to float32 first ({kinds}): the norms are those of the "
                     f"dequantized weights the model computes with")
    loose = [r["name"] for r in tensors if r["method"] == "power" and r["tied_to"] is None
             and not r["rel_error_bound"] <= rtol]
    if loose:
        notes.append(f"Lanczos stopped short of rtol {rtol:g} for {len(loose)} tensor(s) "
                     f"(first: {loose[0]}); see rel_error_bound")
    if any(len(r["shape"]) > 2 for r in tensors):
        notes.append("conv weights are reshaped to (out, in*kernel): their spectral norm is that matrix's, "
                     "not the convolution operator's")
    return notes


def weight_norms(ckpt: LoadedCheckpoint, exact_limit: int = DEFAULT_EXACT_LIMIT, rtol: float = DEFAULT_RTOL,
                 progress: Optional[Callable[[str], None]] = None,
                 components: Optional[Sequence[str]] = None) -> dict:
    """The ``gamma weights norms`` report: tensors, blocks, summary, notes.
    ``components`` (e.g. ``["encoder"]``) restricts it to those blocks' matrices."""
    if isinstance(exact_limit, bool) or not isinstance(exact_limit, int) or exact_limit < 1:
        raise GammaError(f"--exact-limit must be a positive integer, got {exact_limit}")
    arch = ckpt.config.arch
    tensors = tensor_norms(ckpt, exact_limit, rtol, progress, components)
    blocks = block_norms(arch, tensors)
    components = [c for c in COMPONENT_ORDER if any(b["component"] == c for b in blocks)]
    report = {
        "model": {"path": ckpt.path, "format": ckpt.format, "arch": arch},
        "exact_limit": exact_limit, "rtol": rtol,
        "components": None if components is None else list(components),
        "parts": part_table(arch).parts,
        "tensors": tensors,
        "blocks": blocks,
        "summary": summarize(blocks),
        "notes": _notes(ckpt, tensors, rtol),
    }
    if len(components) > 1:
        report["summary_by_component"] = {c: summarize([b for b in blocks if b["component"] == c])
                                          for c in components}
    return report

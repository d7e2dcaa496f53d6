"""What to verify besides the bound options: the input point (:class:`InputSpec`)
and the run (:class:`RunSpec`), each frozen and checked when made, with the
CLI's words in every message.  What depends on the model (its components, the
block count that ``--blocks`` selects from) is checked when the run starts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

from .. import parallel
from ..attack import AttackConfig
from ..errors import GammaError
from ..models import check_center, check_output, check_seq_len
from ..options import check_tolerance
from ..vnnlib import Assertion, parse_property

MODES = ("full", "layer_by_layer", "block_wise")


def parse_tokens(text: Union[str, Sequence[int], None]) -> Optional[list[int]]:
    """``"1,2,3"`` -> [1, 2, 3]."""
    if text is None or not isinstance(text, str):
        return None if text is None else [int(t) for t in text]
    try:
        tokens = [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise GammaError(f"--tokens must be comma-separated integers, got '{text}'") from None
    if not tokens:
        raise GammaError("--tokens is empty")
    return tokens


def select_blocks(spec, n: int) -> list[int]:
    """Block indices from ``"0:4"`` (slice), ``"3"`` or ``"0,2,5"`` (negative
    indices count from the end).  Indices outside the model are an error."""
    if spec is None:
        return list(range(n))
    text = spec if isinstance(spec, str) else ",".join(str(int(i)) for i in spec)
    s = text.replace(" ", "")
    where = f"--blocks {text}: the model has {n} blocks (0..{n - 1})"
    try:
        if ":" in s:
            parts = s.split(":")
            if len(parts) > 3:
                raise ValueError
            ints = [int(p) if p else None for p in parts]
            if len(ints) == 3 and ints[2] == 0:
                raise GammaError(f"--blocks {text}: slice step cannot be zero")
            for v in ints[:2]:
                if v is not None and not -n <= v <= n:
                    raise GammaError(f"{where}; {v} is out of range")
            picked = list(range(n))[slice(*ints)]
        else:
            picked = []
            for v in (int(p) for p in s.split(",")):
                if not -n <= v < n:
                    raise GammaError(f"{where}; block {v} is out of range")
                if v % n not in picked:
                    picked.append(v % n)
    except ValueError:
        raise GammaError(f"--blocks must be a slice (0:4), an index (3) or a list (0,2,5), got '{text}'") from None
    if not picked:
        raise GammaError(f"{where}; '{text}' selects none")
    return picked


def mode_of(block_wise: bool = False, layer_by_layer: bool = False) -> str:
    """The run mode from the two switches of the Python API."""
    if block_wise and layer_by_layer:
        raise GammaError("--block-wise and --layer-by-layer are exclusive")
    return "block_wise" if block_wise else "layer_by_layer" if layer_by_layer else "full"


@dataclass(frozen=True)
class InputSpec:
    """The input point, the centre of the box (:meth:`gamma.models.Model.input_point`), and the output."""
    component: Optional[str] = None       # None: the model's first (Whisper: encoder)
    seq_len: int = 8
    tokens: Union[str, Sequence[int], None] = None      # "1,2,3" or ids; kept as a tuple
    input_path: Optional[str] = None      # the exact input array (.npy)
    center: Optional[str] = None          # None / "default" or "zeros"
    output: str = "hidden"                # or "logits" (decoders)

    def __post_init__(self):
        tokens = parse_tokens(self.tokens)
        object.__setattr__(self, "tokens", None if tokens is None else tuple(tokens))
        check_seq_len(self.seq_len)
        check_center(self.center)
        check_output(self.output)


@dataclass(frozen=True)
class RunSpec:
    """The mode and what it reports.  ``attack`` is given as True / False / an
    :class:`AttackConfig` / None (on in block-wise runs, off otherwise) and kept as a checked
    config or False; ``property`` (a VNN-LIB file or parsed assertions) is read when made."""
    mode: str = "full"                    # MODES
    blocks: Union[str, Sequence[int], None] = None      # block-wise: 0:4, 3 or 0,2,5 (checked at the run)
    tolerance: Optional[float] = None     # verdict "verified" iff every output width is <= tolerance
    property: Union[str, os.PathLike, Sequence[Assertion], None] = None
    worst_k: int = 5
    workers: Optional[int] = None         # block-wise scale-out (gamma.parallel)
    ray: Optional[str] = None
    checkpoint: Optional[str] = None      # the resume file
    attack: Union[bool, AttackConfig, None] = None
    assertions: Optional[tuple[Assertion, ...]] = field(default=None, init=False, repr=False)

    def __post_init__(self):
        if self.mode not in MODES:
            raise GammaError(f"unknown mode '{self.mode}' (choose from {', '.join(MODES)})")
        block_wise = self.mode == "block_wise"
        set_ = object.__setattr__
        set_(self, "tolerance", check_tolerance(self.tolerance))
        if self.worst_k < 1:
            raise GammaError(f"--worst-k must be >= 1, got {self.worst_k}")
        set_(self, "attack", _attack(self.attack, block_wise))
        if self.blocks is not None and not block_wise:
            raise GammaError("--blocks applies to --block-wise runs")
        if self.blocks is not None and not isinstance(self.blocks, str):
            set_(self, "blocks", tuple(self.blocks))
        set_(self, "workers", parallel.check_workers(self.workers))
        for opt, value in (("--workers", self.workers), ("--ray", self.ray), ("--checkpoint", self.checkpoint)):
            if value is not None and not block_wise:
                raise GammaError(f"{opt} applies to --block-wise runs")
        if self.ray is not None:
            parallel.import_ray()            # a missing ray is one line now, not after the model loads
        if self.property is not None:
            if block_wise:
                raise GammaError("--property needs a full-network run (not --block-wise)")
            parsed = parse_property(self.property) if isinstance(self.property, (str, os.PathLike)) \
                else list(self.property)
            set_(self, "assertions", tuple(parsed))

    def attack_config(self) -> Optional[AttackConfig]:
        """The attack to run, or None."""
        return self.attack or None


def _attack(attack, block_wise: bool) -> Union[AttackConfig, bool]:
    if attack is None:
        attack = block_wise
    if isinstance(attack, AttackConfig):
        try:
            return attack.checked()
        except ValueError as e:
            raise GammaError(str(e)) from None
    return AttackConfig() if attack else False

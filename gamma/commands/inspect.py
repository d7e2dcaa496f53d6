"""``gamma inspect MODEL``: what a checkpoint contains."""

from __future__ import annotations

from typing import Optional

from ..errors import GammaError
from ..io import ggml
from ..models import COMPONENTS, Model
from ..verify import load
from .common import emit


def add_parser(subparsers) -> None:
    s = subparsers.add_parser("inspect", help="what a checkpoint contains")
    s.add_argument("model", metavar="MODEL", help="checkpoint file or directory")
    s.add_argument("--json", action="store_true", help="one JSON object on stdout")
    s.set_defaults(func=run)


def run(args) -> int:
    # lazy: header, metadata and tensor table only (GGUF, safetensors): no tensor data is read
    emit(describe(load(args.model, lazy=True)), inspect_lines, args.json)
    return 0


def describe(model: Model) -> dict:
    """Facts about a loaded checkpoint (``gamma inspect``).  Per-component
    sizes are dicts keyed by component (``{"decoder": 30}``)."""
    c, ck = model.config, model.ckpt
    if model.arch == "whisper":
        layers = {"encoder": c.encoder_layers, "decoder": c.decoder_layers}
        heads = {"encoder": c.encoder_heads, "decoder": c.decoder_heads}
        kv_heads = dict(heads)
        ffn = {"encoder": c.encoder_ffn_dim, "decoder": c.decoder_ffn_dim}
        head_dim = c.d_model // c.encoder_heads if c.encoder_heads else 0
    else:
        layers, heads = {"decoder": c.n_layers}, {"decoder": c.n_heads}
        kv_heads, ffn, head_dim = {"decoder": c.n_kv_heads or c.n_heads}, {"decoder": c.d_ff}, c.head_dim
    dtypes: dict[str, int] = {}
    for t in ck.dtypes.values():
        dtypes[t] = dtypes.get(t, 0) + 1
    return {
        "path": ck.path, "format": ck.format, "arch": model.arch,
        "components": list(COMPONENTS[model.arch]),
        "layers": layers, "hidden_size": c.d_model, "heads": heads, "kv_heads": kv_heads,
        "head_dim": head_dim, "ffn": ffn, "vocab_size": c.vocab_size,
        "parameters": ck.n_params, "tensors": len(ck.tensors),
        "dtypes": dict(sorted(dtypes.items(), key=lambda kv: (-kv[1], kv[0]))),
        "notes": list(ck.notes),
        "llama_cpp_engine": _llama_cpp(ck),
    }


def _llama_cpp(ck) -> Optional[str]:
    """GGUF only: whether ``--engine llama.cpp`` models this file's matmuls (the hidden state's; the
    LM head too where it is modelled), else the reason in one line; None for other formats."""
    if ck.format != "gguf":
        return None
    try:
        ggml.check_checkpoint(ck, "hidden")
    except GammaError as e:
        return str(e).replace("--engine llama.cpp: ", "not modelled: ")
    try:
        ggml.check_checkpoint(ck, "logits")
    except GammaError:
        return "modelled (the hidden state; not the LM head's type)"
    return "modelled"


def _per_component(d: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in d.items())


def inspect_lines(info: dict) -> list[str]:
    rows = [
        ("path", info["path"]),
        ("format", info["format"]),
        ("architecture", info["arch"]),
        ("components", ", ".join(info["components"])),
        ("layers", _per_component(info["layers"])),
        ("hidden size", info["hidden_size"]),
        ("heads", _per_component(info["heads"])),
        ("kv heads", _per_component(info["kv_heads"])),
        ("head dim", info["head_dim"]),
        ("ffn", _per_component(info["ffn"])),
        ("vocab", info["vocab_size"]),
        ("parameters", f"{info['parameters']:,} ({info['tensors']} tensors)"),
        ("dtypes", ", ".join(f"{k} x{v}" for k, v in info["dtypes"].items()) or "-"),
    ]
    if info.get("llama_cpp_engine"):
        rows.append(("llama.cpp", f"--engine llama.cpp: {info['llama_cpp_engine']}"))
    lines = [f"{k:<13} {v}" for k, v in rows]
    for note in info["notes"]:
        lines.append(f"{'note':<13} {note}")
    return lines

"""Check saved block-wise bounds against the reference engine (transformers).

    gamma verify MODEL --block-wise --json --save-bounds RUN.npz > RUN.json
    python benchmarks/check_saved.py RUN.json RUN.npz [--samples 200] [--steps 10]

For every block in the run, the transformers layer with the same weights
(Whisper encoder/decoder layer, Llama/Qwen3 decoder layer, float32, eager
attention) is evaluated at random points and PGD-attacked points of the
block's box ``block{k}_input +- epsilon``; a violation is an output outside
``[block{k}_lower, block{k}_upper]``.  Prints one row per block and exits 1
on any violation.  Uses the test fixtures' transformers builders.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import fixtures as F                          # noqa: E402
from gamma.attack import explore              # noqa: E402
from gamma.io import load_checkpoint          # noqa: E402


def layer_functions(run: dict, path: str) -> dict:
    """block index -> fn(x (n, T, d) float64) -> (n, T, d) float32 output of transformers' layer."""
    arch, comp = run["model"]["arch"], run["component"]
    T = run["seq_len"]
    if arch == "whisper":
        hf = F.whisper_hf_from_checkpoint(load_checkpoint(path))
        if comp == "encoder":
            layers = hf.model.encoder.layers
            def make_enc(layer):
                def fn(x):
                    out = layer(x.float(), None)
                    return out[0] if isinstance(out, tuple) else out
                return fn
            return {k: make_enc(L) for k, L in enumerate(layers)}
        raise SystemExit("check_saved: the Whisper decoder needs the encoder output; not supported here")
    if os.path.isfile(path) and open(path, "rb").read(4) == b"GGUF":
        hf = F.hf_from_gguf(path)
    else:
        import transformers
        F.quiet_transformers()
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    pos = torch.arange(T)[None]
    mask = torch.full((T, T), float("-inf")).triu(1)[None, None]

    def make(layer):
        def fn(x):
            x = x.float()
            cos, sin = hf.model.rotary_emb(x, pos.expand(len(x), -1))
            out = layer(x, attention_mask=mask, position_ids=pos, position_embeddings=(cos, sin))
            return out[0] if isinstance(out, tuple) else out
        return fn
    return {k: make(L) for k, L in enumerate(hf.model.layers)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_json")
    p.add_argument("bounds_npz")
    p.add_argument("--samples", type=int, default=200)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--model", help="checkpoint path (default: the run's)")
    a = p.parse_args(argv)
    with open(a.run_json) as f:
        run = json.load(f)
    npz = np.load(a.bounds_npz)
    eps = run["epsilon"]
    fns = layer_functions(run, a.model or run["model"]["path"])
    total = 0
    print(f"{run['model']['arch']} {run['component']} T={run['seq_len']} {run['method']} eps={eps:g}: "
          f"{a.samples} samples + {a.steps}-step PGD on 8 outputs, against transformers' float32 layers")
    print(f"{'block':>6} {'violations':>10} {'certified max width':>20} {'empirical max width':>20} {'seconds':>8}")
    for row in run["blocks"]:
        k = row["block_index"]
        if f"block{k}_lower" not in npz:
            print(f"{k:>6} {'(failed)':>10}")
            continue
        x = torch.from_numpy(npz[f"block{k}_input"])
        lo, up = torch.from_numpy(npz[f"block{k}_lower"]), torch.from_numpy(npz[f"block{k}_upper"])
        t0 = time.perf_counter()
        e = explore(fns[k], x, eps, lo, up, n_samples=a.samples, seed=k, steps=a.steps, restarts=1)
        bad, emp = e.violations, float((e.upper - e.lower).max())
        total += bad
        print(f"{k:>6} {bad:>10} {float((up - lo).max()):>20.4g} {emp:>20.4g} {time.perf_counter() - t0:>8.1f}")
    print(f"total violations: {total}")
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())

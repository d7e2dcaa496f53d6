"""Float32 rounding that real engines show, against gamma's rounding floor.

For the real Whisper tiny.en encoder and SmolLM2-135M, on the same weights and input
as the bounds (the default mel centre / token embeddings): the largest
``|engine float32 - float64|`` at each block's output and at the model's output,
where float64 is gamma's forward (parity-tested against the engines), for

* ctranslate2, ``compute_type="float32"`` (Whisper; it takes only the full 30 s window,
  so its row is at T=1500);
* transformers, float32, eager attention (Whisper built with as many positions as
  tokens, so T=8 runs the same function as gamma's T=8 graph);
* gamma's own float32 forward.

Beside each, the rounding floor: the certified width at eps 0 in the default mode and in
``float32-probabilistic`` (a block on its nominal input, or the whole model), and floor /
largest difference.  An
engine's block row includes what the blocks before it rounded; the floor of a block
does not, so the ratio there is if anything too small.

    python benchmarks/engines.py [--whole-floor] [--out BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from gamma import Model  # noqa: E402
from gamma.bounds import compute_bounds  # noqa: E402
from gamma.io import load_checkpoint, zoo  # noqa: E402
from gamma.ops import evaluate  # noqa: E402

T = 8
SECTION = "12. Float32 rounding in real engines"


def _maxdiff(a, b) -> float:
    return float((a.double() - b.double()).abs().max())


def _block_outputs(g):
    return [g.block_io(b)[1] for b in g.blocks()]


def _layer_outputs(layers, run) -> list:
    """The outputs of each module in ``layers`` (forward hooks) while ``run()`` runs."""
    got: list = []
    hooks = [m.register_forward_hook(lambda mod, a, o: got.append((o[0] if isinstance(o, tuple) else o)[0]))
             for m in layers]
    try:
        with torch.no_grad():
            last = run()
    finally:
        for h in hooks:
            h.remove()
    return got, last


def _gamma_f32(g, x):
    g32 = copy.deepcopy(g).to(dtype=torch.float32)
    return evaluate(g32, x.float(), keep_all=True)


def whisper_rows(path, whole_floor: bool):
    import fixtures as F
    model = Model(load_checkpoint(path))
    ck = model.ckpt
    rows = []
    for t in (T, 1500):
        g = model.graph("encoder", seq_len=t)
        x = model.input_point("encoder", seq_len=t).x
        ref = evaluate(g, x, keep_all=True)
        outs = _block_outputs(g) + [g.output]
        eng = {"gamma": _gamma_f32(g, x)}
        cfg = copy.copy(ck.config)
        cfg.max_source_positions = t
        shallow = copy.copy(ck)
        shallow.config = cfg
        shallow.tensors = dict(ck.tensors)
        key = "model.encoder.embed_positions.weight"
        shallow.tensors[key] = ck.tensors[key][:t]
        hf = F.whisper_hf_from_checkpoint(shallow).float()
        per, last = _layer_outputs(hf.model.encoder.layers,
                                   lambda: hf.model.encoder(x.float()[None]).last_hidden_state[0])
        eng["transformers"] = dict(zip(outs, per + [last]))
        if t == 1500:
            import ctranslate2
            ct2 = ctranslate2.models.Whisper(path, device="cpu", compute_type="float32")
            y = np.array(ct2.encode(ctranslate2.StorageView.from_array(x.float()[None].numpy())))
            eng["ctranslate2"] = {g.output: torch.from_numpy(y)[0]}
        for name in outs:
            scope = "whole" if name == g.output else name.split(".")[0]
            row = {"model": "Whisper tiny.en", "scope": scope, "T": t}
            for e, vals in eng.items():
                if name in vals:
                    row[e] = _maxdiff(vals[name], ref[name])
            if t == T:
                row.update(floor(model, g, x, scope, whole_floor))
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def smollm2_rows(path, blocks):
    import fixtures as F
    model = Model(load_checkpoint(path))
    g = model.graph(seq_len=T)
    x = model.input_point(seq_len=T).x
    ref = evaluate(g, x, keep_all=True)
    outs = _block_outputs(g) + [g.output]
    f32 = _gamma_f32(g, x)
    hf = F.hf_from_gguf(path)
    per, last = _layer_outputs(hf.model.layers, lambda: hf.model(inputs_embeds=x.float()[None]).last_hidden_state[0])
    hf_out = dict(zip(outs, per + [last]))
    rows = []
    for i, name in enumerate(outs):
        whole = name == g.output
        if not whole and i not in blocks:
            continue
        scope = "whole" if whole else f"layer{i}"
        row = {"model": "SmolLM2-135M", "scope": scope, "T": T,
               "transformers": _maxdiff(hf_out[name], ref[name]),
               "gamma": _maxdiff(f32[name], ref[name])}
        if not whole:
            row.update(floor(model, g, x, scope, False))
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def floor(model, g, x, scope, whole_floor: bool) -> dict:
    """The certified width at eps 0 of the block on its nominal input, or of the whole model
    when ``whole_floor``, in the default mode and in the probabilistic one."""
    if scope == "whole":
        if not whole_floor:
            return {}
        bg, bx = g, x
    else:
        vals = evaluate(g, x, keep_all=True)
        bg = g.block_graph(scope)
        bx = vals[bg.input].contiguous()
    out = {}
    for key, arith in (("floor", "float32"), ("prob_floor", "float32-probabilistic")):
        t0 = time.perf_counter()
        r = compute_bounds(bg, bx, 0.0, "crown", arithmetic=arith, allow_zero=True)
        out[key], out[key + "_s"] = float((r.upper - r.lower).max()), time.perf_counter() - t0
    return out


def _g(v):
    return "-" if v is None else ("inf" if v == float("inf") else f"{v:.3g}")


def table(rows) -> list[str]:
    head = ["model", "scope", "T", "ctranslate2 float32", "transformers float32", "gamma float32", "largest",
            "rounding floor", "floor / largest", "rounding floor (probabilistic)", "floor (probabilistic) / largest"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        big = max(r.get(e, 0.0) for e in ("ctranslate2", "transformers", "gamma"))
        fl, pf = r.get("floor"), r.get("prob_floor")
        lines.append("| " + " | ".join([r["model"], r["scope"], str(r["T"]), _g(r.get("ctranslate2")),
                                        _g(r.get("transformers")), _g(r.get("gamma")), _g(big), _g(fl),
                                        _g(None if fl is None else fl / big), _g(pf),
                                        _g(None if pf is None else pf / big)]) + " |")
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--whole-floor", action="store_true", help="also the whole Whisper encoder's floor (minutes)")
    ap.add_argument("--smollm2-blocks", default="0,15,29")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    rows = whisper_rows(zoo.whisper_tiny_en(), args.whole_floor)
    rows += smollm2_rows(zoo.smollm2_135m(), {int(b) for b in args.smollm2_blocks.split(",")})
    load = os.getloadavg()
    text = "\n".join([f"## {SECTION}", "",
                      "`python benchmarks/engines.py" + (" --whole-floor" if args.whole_floor else "")
                      + f"` (load average {load[0]:.1f} at the end). Largest |engine float32 - gamma float64| on "
                      "the same weights and input; block rows: that block's output in a whole forward pass (the "
                      "rounding of the blocks before it included). Rounding floor: certified width at eps 0, "
                      "default and probabilistic modes, CROWN (a block on its nominal input; the whole model). ctranslate2 runs "
                      "only the full 30 s window (T=1500).", ""] + table(rows) + [""])
    from depth import emit
    emit(text, args.out, SECTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())

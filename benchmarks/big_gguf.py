"""Lazy, per-block weights on a Qwen3-8B-shaped GGUF Q4_0 (issue 20) -> markdown.

Writes a random model of the Qwen3-8B shape (36 blocks, hidden 4096, 32 heads / 8 kv
heads, head_dim 128, MLP 12288, vocabulary 151936 with a token list and merges of
that size, tied embeddings: ``_models.py``'s weights, seeded) as a GGUF Q4_0 with
gguf-py, streamed tensor by tensor (4.26 GB on disk, 30.3 GB as float32, more
than this machine's memory), then measures, each command in its own process under
``/usr/bin/time -v`` (peak resident memory of the largest process, wall time):

1. ``gamma inspect FILE`` (wall time, median of 3);
2. ``gamma verify FILE --block-wise --blocks 0,35 --intermediate cut --seq-len 4``
   (the attack on, as by default);
3. the same over ``--workers 2`` and ``--ray local`` (if ray is installed), with
   ``--no-attack`` (the attack runs in the driver; these rows measure the workers):
   per-worker peak memory from the JSON report's ``memory``;
4. the same block-wise command on SmolLM2-135M (Q4_1 GGUF, blocks 0,29), and with
   ``--baseline-rev REV`` also at revision REV (a ``git worktree``), for before/after.

    python benchmarks/big_gguf.py [--dir /tmp/gamma-big] [--keep] [--runs inspect,serial,workers,ray,smol]
                                  [--baseline-rev REV] [--out FILE] [--json FILE] [--wait-lock FILE]

The file is written under ``--dir`` (never into the repository) and reused with
``--keep`` when it is already there.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)                       # this checkout's gamma, not an installed copy
sys.path.insert(0, HERE)

from _models import SEED, Qwen3Shape, qwen3_tensors  # noqa: E402

QWEN3_8B = Qwen3Shape(num_hidden_layers=36, hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                      head_dim=128, intermediate_size=12288, vocab_size=151936)
VERIFY = ["--block-wise", "--intermediate", "cut", "--seq-len", "4", "--json", "--quiet"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ the file
def _specs(s: Qwen3Shape):
    """(hf name, shape) in qwen3_tensors' order, without making the values; tied: no lm_head."""
    q, kv, d, f = s.num_attention_heads * s.head_dim, s.num_key_value_heads * s.head_dim, s.hidden_size, \
        s.intermediate_size
    yield "model.embed_tokens.weight", (s.vocab_size, d)
    for i in range(s.num_hidden_layers):
        p = f"model.layers.{i}."
        yield from ((p + "input_layernorm.weight", (d,)), (p + "self_attn.q_proj.weight", (q, d)),
                    (p + "self_attn.k_proj.weight", (kv, d)), (p + "self_attn.v_proj.weight", (kv, d)),
                    (p + "self_attn.o_proj.weight", (d, q)), (p + "self_attn.q_norm.weight", (s.head_dim,)),
                    (p + "self_attn.k_norm.weight", (s.head_dim,)), (p + "post_attention_layernorm.weight", (d,)),
                    (p + "mlp.gate_proj.weight", (f, d)), (p + "mlp.up_proj.weight", (f, d)),
                    (p + "mlp.down_proj.weight", (d, f)))
    yield "model.norm.weight", (d,)


def write_q4_0(path: str, s: Qwen3Shape = QWEN3_8B, seed: int = SEED) -> str:
    """Write ``s`` as a qwen3 GGUF, matrices Q4_0 (gguf-py's quantizer), 1-D tensors F32, one
    tensor in memory at a time (tensor infos first, then each tensor's data as it is made)."""
    import gguf
    Q = gguf.GGMLQuantizationType
    block, type_size = gguf.GGML_QUANT_SIZES[Q.Q4_0]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3, s.num_hidden_layers)
    tmp = path + ".part"
    w = gguf.GGUFWriter(tmp, "qwen3")
    w.add_name("random-qwen3-8b-shape")
    w.add_block_count(s.num_hidden_layers)
    w.add_context_length(s.max_position_embeddings)
    w.add_embedding_length(s.hidden_size)
    w.add_feed_forward_length(s.intermediate_size)
    w.add_head_count(s.num_attention_heads)
    w.add_head_count_kv(s.num_key_value_heads)
    w.add_layer_norm_rms_eps(s.rms_norm_eps)
    w.add_rope_freq_base(s.rope_theta)
    w.add_vocab_size(s.vocab_size)
    w.add_key_length(s.head_dim)
    w.add_value_length(s.head_dim)
    # a tokenizer of the real size (gamma never reads it; a header reader must walk past it)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"<t{i}>" for i in range(s.vocab_size)])
    w.add_token_merges([f"<t{i}> <t{i + 1}>" for i in range(s.vocab_size - 549)])
    for name, shape in _specs(s):
        gname = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if len(shape) == 1:
            w.add_tensor_info(gname, shape, np.dtype(np.float32), 4 * shape[0])
        else:
            byte_shape = (shape[0], shape[1] // block * type_size)
            w.add_tensor_info(gname, byte_shape, np.dtype(np.uint8), byte_shape[0] * byte_shape[1], raw_dtype=Q.Q4_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    specs = dict(_specs(s))
    for n, (name, data) in enumerate(t for t in qwen3_tensors(s, seed) if t[0] in specs):
        assert data.shape == specs[name], name
        w.write_tensor_data(data if data.ndim == 1 else gguf.quants.quantize(data, Q.Q4_0))
        if n % 40 == 0:
            log(f"  {n}/{len(specs)} tensors written")
    w.close()
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------ measuring
WAIT_FOR: list[str] = []      # --wait-lock: files whose existence means "someone is timing: wait"


def timed(cmd: list[str], cwd: str = ROOT, env=None) -> dict:
    """Run ``cmd`` under /usr/bin/time -v: returncode, stdout, wall s, peak RSS MiB, load average."""
    while any(os.path.exists(f) for f in WAIT_FOR):
        time.sleep(15)
    with tempfile.NamedTemporaryFile("r", suffix=".time") as tf:
        t0 = time.perf_counter()
        p = subprocess.run(["/usr/bin/time", "-v", "-o", tf.name, *cmd], cwd=cwd, env=env,
                           capture_output=True, text=True)
        wall = time.perf_counter() - t0
        report = tf.read()
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", report)
    if p.returncode:
        log(f"  exit {p.returncode}: {p.stderr.strip()[-400:]}")
    return {"rc": p.returncode, "stdout": p.stdout, "stderr": p.stderr, "wall": wall,
            "peak_mb": int(m.group(1)) / 1024 if m else float("nan"), "load": _load()}


def _load() -> str:
    return "/".join(f"{v:.2f}" for v in os.getloadavg())


def gamma_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "gamma", *args]


def verify_row(label: str, r: dict) -> dict:
    d = json.loads(r["stdout"]) if r["rc"] == 0 else {}
    mem = d.get("memory") or {}
    blocks = d.get("blocks") or []
    t = d.get("timings") or {}
    return {"label": label, "wall": r["wall"], "peak_mb": r["peak_mb"], "load": r["load"], "rc": r["rc"],
            "driver_mb": mem.get("peak_rss_mb"),
            "workers": [(w["pid"], w["peak_rss_mb"], w["blocks"]) for w in mem.get("workers", [])],
            "widths": [(b["block_name"], b["output_width"], b["seconds"]) for b in blocks],
            "attacked": [(b["block_name"], b.get("attacked_width")) for b in blocks],
            "timings": t, "json": d}


def _gib(mb) -> str:
    return "-" if mb is None else f"{mb / 1024:.2f}"


def markdown(path: str, size: int, inspect_runs: list[dict], rows: list[dict], notes: list[str]) -> str:
    s = QWEN3_8B
    f32 = (s.params() - s.vocab_size * s.hidden_size) * 4          # tied: no LM head
    out = ["| model | command | wall s | peak RSS GiB (largest process) | driver peak GiB | per-worker peak GiB "
           "| load avg after |",
           "|---|---|---|---|---|---|---|"]
    if inspect_runs:
        walls = [r["wall"] for r in inspect_runs]
        out.append(f"| Qwen3-8B shape, Q4_0 | `gamma inspect` (median of {len(walls)}) | "
                   f"{statistics.median(walls):.2f} | {_gib(inspect_runs[-1]['peak_mb'])} | - | - | "
                   f"{inspect_runs[-1]['load']} |")
    for r in rows:
        workers = ", ".join(f"{_gib(mb)} (blocks {','.join(map(str, b))})" for _, mb, b in r["workers"]) or "-"
        out.append(f"| {r['model']} | {r['label']} | {r['wall']:.0f} | **{_gib(r['peak_mb'])}** | "
                   f"{_gib(r['driver_mb'])} | {workers} | {r['load']} |" if r["rc"] == 0 else
                   f"| {r['model']} | {r['label']} | - | failed (exit {r['rc']}) | - | - | {r['load']} |")
    out += ["", f"File: {path}: {size / 1e9:.2f} GB on disk, {f32 / 1e9:.1f} GB of weights as float32 "
                f"({s.params() - s.vocab_size * s.hidden_size:,} parameters); this machine has "
                f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB of memory and "
                f"{os.cpu_count()} cores, shared with other jobs (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')})."]
    for r in rows:
        if r["rc"] or not r["widths"]:
            continue
        t = r["timings"]
        widths = "; ".join(f"{n} max width {w:.4g} ({sec:.0f} s)" for n, w, sec in r["widths"])
        split = ", ".join(f"{k} {t[k]:.0f} s" for k in ("load", "nominal", "bounds", "attack") if k in t)
        out.append(f"* {r['model']}, {r['label']}: {widths}; {split}.")
    out += [f"* {n}" for n in notes]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "gamma-big"))
    ap.add_argument("--keep", action="store_true", help="reuse the GGUF when it is already there")
    ap.add_argument("--runs", default="inspect,serial,workers,ray,smol",
                    help="what to measure, comma-separated (default: all of inspect,serial,workers,ray,smol)")
    ap.add_argument("--baseline-rev", metavar="REV", help="also run the SmolLM2 command at this git revision")
    ap.add_argument("--out", metavar="FILE", help="write the markdown here (default: stdout)")
    ap.add_argument("--json", metavar="FILE", help="also write the measurements as JSON")
    ap.add_argument("--wait-lock", metavar="FILE", action="append", default=[],
                    help="before each measured command, wait while FILE exists (a shared machine's timing lock)")
    args = ap.parse_args(argv)
    WAIT_FOR.extend(args.wait_lock)
    os.makedirs(args.dir, exist_ok=True)
    path = os.path.join(args.dir, f"qwen3-8b-shape-q4_0-seed{SEED}.gguf")
    if not (args.keep and os.path.exists(path)):
        log(f"writing {path}")
        t0 = time.perf_counter()
        write_q4_0(path)
        log(f"written in {time.perf_counter() - t0:.0f} s")
    size = os.path.getsize(path)
    notes: list[str] = []

    want = {w.strip() for w in args.runs.split(",")}
    inspect_runs = []
    if "inspect" in want:
        log("gamma inspect")
        inspect_runs = [timed(gamma_cmd("inspect", path)) for _ in range(3)]
        if inspect_runs[-1]["rc"]:
            raise SystemExit("gamma inspect failed")
    rows = []
    runs = [("serial", ["--blocks", "0,35"])] if "serial" in want else []
    if "workers" in want:
        runs.append(("`--workers 2 --no-attack`", ["--blocks", "0,35", "--workers", "2", "--no-attack"]))
    ray_ok = subprocess.run([sys.executable, "-c", "import ray"], capture_output=True).returncode == 0
    if "ray" in want and ray_ok:
        runs.append(("`--ray local --no-attack`", ["--blocks", "0,35", "--ray", "local", "--no-attack"]))
    elif "ray" in want:
        notes.append("Ray: not installed here (`python -c 'import ray'` fails); not run.")
    for label, extra in runs:
        log(f"gamma verify {label}")
        r = verify_row(f"`verify --block-wise --blocks 0,35 --intermediate cut --seq-len 4` {label}",
                       timed(gamma_cmd("verify", path, *VERIFY, *extra)))
        r["model"] = "Qwen3-8B shape, Q4_0"
        rows.append(r)
        log(f"  {r['wall']:.0f} s, peak {_gib(r['peak_mb'])} GiB, workers {r['workers']}")

    import gamma.io.zoo as zoo
    smol = zoo.smollm2_135m()
    if "smol" in want:
        log("SmolLM2-135M")
        r = verify_row("`verify --block-wise --blocks 0,29 --intermediate cut --seq-len 4`",
                       timed(gamma_cmd("verify", smol, *VERIFY, "--blocks", "0,29")))
        r["model"] = "SmolLM2-135M, Q4_1"
        rows.append(r)
    if args.baseline_rev and "smol" in want:
        wt = os.path.join(args.dir, "baseline-worktree")
        if os.path.exists(wt):
            subprocess.run(["git", "worktree", "remove", "--force", wt], cwd=ROOT, check=False)
        subprocess.run(["git", "worktree", "add", "--detach", wt, args.baseline_rev], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            env = dict(os.environ, PYTHONPATH=wt)
            old = verify_row(f"same, at {args.baseline_rev} (eager)",
                             timed(gamma_cmd("verify", smol, *VERIFY, "--blocks", "0,29"), cwd=wt, env=env))
            old["model"] = "SmolLM2-135M, Q4_1"
            rows.append(old)
            same = [w for _, w, _ in old["widths"]] == [w for _, w, _ in r["widths"]]
            notes.append(f"SmolLM2 block widths at {args.baseline_rev} and now: "
                         f"{'identical' if same else 'DIFFERENT'} ({[w for _, w, _ in r['widths']]}).")
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", wt], cwd=ROOT, check=False)
    if len(rows) > 1 and rows[0]["rc"] == 0:
        base = [w for _, w, _ in rows[0]["widths"]]
        for r in rows[1:]:
            if r["model"] == rows[0]["model"] and r["rc"] == 0:
                same = [w for _, w, _ in r["widths"]] == base
                notes.append(f"{r['label']}: block widths {'identical to' if same else 'DIFFERENT from'} the serial run's.")
    text = markdown(path, size, inspect_runs, rows, notes)
    if args.json:
        keep = [{k: v for k, v in r.items() if k != "json"} for r in rows]
        with open(args.json, "w") as f:
            json.dump({"inspect": [{k: v for k, v in r.items() if k != "stdout"} for r in inspect_runs],
                       "rows": keep, "notes": notes}, f, indent=1, default=str)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""gamma vs auto_LiRPA on the same pre-LN transformer blocks, side by side in one run.

Each config is a tiny random Whisper encoder built with transformers and saved
with ``save_pretrained``.  The bounded function is the chain of its encoder
blocks (LN -> multi-head softmax self-attention -> residual -> LN -> fc1 ->
GELU(erf) -> fc2 -> residual), over the L-inf box of radius eps around the
nominal hidden state before the first block (gamma's float64 forward pass of
the stem at its default mel input).

* gamma: ``compute_bounds`` on the block graph gamma builds from the checkpoint
  (float64, ``intermediate="crown"`` as ``gamma verify`` uses).
* auto_LiRPA: a small ``torch.nn.Module`` with the same weights (read from the
  same safetensors file), float32 as auto_LiRPA is normally run; its float64
  nominal output must equal gamma's ``evaluate`` to 1e-5 before it is bounded.
  ``BoundedModule`` + ``PerturbationLpNorm(norm=inf, eps)``, methods CROWN, IBP.

Every (tool, config, eps) runs in its own subprocess (set up once, then IBP,
then CROWN) under a wall-time limit and an address-space limit (``RLIMIT_AS``:
``--mem-gb``, or the machine's free memory when that is less), so a timeout or
an OOM is a recorded failure.  Peak memory is the child's ``ru_maxrss``;
"bound RSS" is that peak minus the child's peak before the bound call.  Both
sides' bounds are checked against gamma's float64 forward pass at the centre,
box corners and uniform samples.  The table goes to ``--out`` (default
``benchmarks/out/autolirpa.md``) and stdout; the numbers also to a ``.json``
beside it.

    python benchmarks/autolirpa.py [--quick] [--out FILE.md] [--timeout S] [--mem-gb G]

auto_LiRPA is optional: install it from a source checkout with
``pip install --no-deps`` (see BENCHMARKS.md); without it only gamma's side runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)

SEED = 1234
LN_EPS = 1e-5                # transformers' WhisperEncoderLayer: nn.LayerNorm default
NOMINAL_TOL = 1e-5           # auto_LiRPA module (float64) vs gamma's evaluate
SAMPLES = 256                # box samples (plus the centre) for the containment check
# the sides: gamma as `gamma verify` runs it (float32-sound), gamma bounding the real-valued function
# as auto_LiRPA does (--arithmetic real: no float32 margins), auto_LiRPA
TOOLS = ("gamma", "gamma-real", "auto_LiRPA")
SHOWN = {"gamma": "gamma", "gamma-real": "gamma, real arithmetic", "auto_LiRPA": "auto_LiRPA"}


@dataclass(frozen=True)
class Config:
    name: str
    d: int
    heads: int
    ffn: int
    tokens: int
    layers: int
    eps: tuple[float, ...]

    @property
    def label(self) -> str:
        return f"d{self.d} h{self.heads} ffn{self.ffn} T{self.tokens} L{self.layers}"


QUICK = [Config("w64-T16-L1", 64, 4, 256, 16, 1, (1e-3,))]
FULL = [
    Config("w64-T16-L1", 64, 4, 256, 16, 1, (1e-3, 1e-2)),
    Config("w64-T16-L2", 64, 4, 256, 16, 2, (1e-3, 1e-2)),
    Config("w128-T32-L1", 128, 4, 512, 32, 1, (1e-3,)),
    Config("w384-T8-L1", 384, 6, 1536, 8, 1, (1e-3,)),        # Whisper tiny's block shape
]
METHODS = ("ibp", "crown")        # cheap first: a CROWN failure keeps the IBP result
LIRPA_METHOD = {"crown": "CROWN", "ibp": "IBP"}


# ------------------------------------------------------------------ preparation (parent)
def build_checkpoint(cfg: Config, folder: str) -> str:
    """A seeded random Whisper (every parameter perturbed, as tests/fixtures.py does), saved with save_pretrained."""
    import transformers as tf
    tf.utils.logging.set_verbosity_error()
    torch.manual_seed(SEED)
    conf = tf.WhisperConfig(vocab_size=100, d_model=cfg.d, encoder_layers=cfg.layers, decoder_layers=1,
                            encoder_attention_heads=cfg.heads, decoder_attention_heads=cfg.heads,
                            encoder_ffn_dim=cfg.ffn, decoder_ffn_dim=cfg.ffn, num_mel_bins=80,
                            max_source_positions=cfg.tokens, max_target_positions=cfg.tokens,
                            pad_token_id=99, bos_token_id=98, eos_token_id=99, decoder_start_token_id=97)
    model = tf.WhisperForConditionalGeneration(conf)
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.eval().save_pretrained(folder)
    return folder


def gamma_blocks(model, cfg: Config):
    """(encoder graph, graph of blocks layer0..layer{L-1}) of a loaded gamma Model."""
    g = model.graph("encoder", cfg.tokens)
    first, _ = g.block_io("layer0")
    _, last = g.block_io(f"layer{cfg.layers - 1}")
    return g, g.subgraph(first, last, name=f"layer0..layer{cfg.layers - 1}")


def prepare(cfg: Config, folder: str) -> dict:
    """Checkpoint + block input point + gamma's nominal block output, saved for the workers."""
    from gamma.ops import evaluate
    from gamma.verify import load
    ckpt = build_checkpoint(cfg, os.path.join(folder, "model"))
    model = load(ckpt)
    g, sub = gamma_blocks(model, cfg)
    x_mel = model.input_point("encoder", cfg.tokens).x
    x = evaluate(g, x_mel, keep_all=True)[sub.input]             # (T, d) float64, nominal block input
    y = evaluate(sub, x)                                          # (T, d) float64
    point = os.path.join(folder, "point.pt")
    torch.save({"x": x, "y": y}, point)
    return {"ckpt": ckpt, "point": point, "x": x, "y": y, "graph": sub}


# ------------------------------------------------------------------ auto_LiRPA side (worker)
def lirpa_module(ckpt: str, cfg: Config) -> torch.nn.Module:
    """The encoder blocks as a plain torch module, weights from the same safetensors file."""
    from auto_LiRPA.operators.gelu import GELU      # auto_LiRPA's erf GELU (traced as custom::Gelu)
    from safetensors.torch import load_file
    sd = load_file(os.path.join(ckpt, "model.safetensors"))
    d, H = cfg.d, cfg.heads
    dh = d // H
    scale = float(torch.tensor(dh ** -0.5, dtype=torch.float32))     # transformers' q scaling

    def lin(p, out_f, in_f, bias=True):
        m = torch.nn.Linear(in_f, out_f, bias=bias)
        with torch.no_grad():
            m.weight.copy_(sd[p + ".weight"])
            if bias:
                m.bias.copy_(sd[p + ".bias"])
        return m

    def ln(p):
        m = torch.nn.LayerNorm(d, eps=LN_EPS)
        with torch.no_grad():
            m.weight.copy_(sd[p + ".weight"])
            m.bias.copy_(sd[p + ".bias"])
        return m

    class Block(torch.nn.Module):
        def __init__(self, i):
            super().__init__()
            p = f"model.encoder.layers.{i}."
            a = p + "self_attn."
            self.ln1, self.ln2 = ln(p + "self_attn_layer_norm"), ln(p + "final_layer_norm")
            self.q, self.k, self.v = lin(a + "q_proj", d, d), lin(a + "k_proj", d, d, bias=False), lin(a + "v_proj", d, d)
            self.o = lin(a + "out_proj", d, d)
            self.fc1, self.fc2, self.gelu = lin(p + "fc1", cfg.ffn, d), lin(p + "fc2", d, cfg.ffn), GELU()

        def heads(self, t):                                       # (1, T, d) -> (1, H, T, dh)
            return t.reshape(1, cfg.tokens, H, dh).transpose(1, 2)

        def forward(self, x):                                     # x: (1, T, d)
            n = self.ln1(x)
            q, k, v = self.heads(self.q(n) * scale), self.heads(self.k(n)), self.heads(self.v(n))
            p = torch.softmax(torch.matmul(q, k.transpose(2, 3)), dim=-1)      # (1, H, T, T)
            a = torch.matmul(p, v).transpose(1, 2).reshape(1, cfg.tokens, d)
            h = x + self.o(a)
            return h + self.fc2(self.gelu(self.fc1(self.ln2(h))))

    return torch.nn.Sequential(*[Block(i) for i in range(cfg.layers)]).eval()


def lirpa_setup(cfg: Config, job: dict):
    """(setup info, bound function) for auto_LiRPA on the block module."""
    from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm
    point = torch.load(job["point"])
    t0 = time.perf_counter()
    net = lirpa_module(job["ckpt"], cfg)
    with torch.no_grad():
        y64 = net.double()(point["x"].unsqueeze(0))[0]
    err = float((y64 - point["y"]).abs().max())
    if not err <= NOMINAL_TOL:
        raise RuntimeError(f"auto_LiRPA module differs from gamma's forward by {err:.3g} > {NOMINAL_TOL}")
    net = net.float()
    x = point["x"].float().unsqueeze(0)                           # (1, T, d)
    bounded = BoundedModule(net, (torch.zeros_like(x),), device="cpu")
    setup = time.perf_counter() - t0
    bx = BoundedTensor(x, PerturbationLpNorm(norm=math.inf, eps=job["eps"]))

    def bound(method):
        lb, ub = bounded.compute_bounds(x=(bx,), method=LIRPA_METHOD[method])
        return lb.detach()[0].double(), ub.detach()[0].double()      # (T, d)
    return {"setup_s": setup, "nominal_err": err}, bound


# ------------------------------------------------------------------ gamma side (worker)
def gamma_setup(cfg: Config, job: dict):
    """(setup info, bound function) for gamma on its block graph."""
    from gamma.bounds import compute_bounds
    from gamma.ops import evaluate
    from gamma.verify import load
    point = torch.load(job["point"])
    t0 = time.perf_counter()
    _, sub = gamma_blocks(load(job["ckpt"]), cfg)
    evaluate(sub, point["x"])                                         # warm-up, as auto_LiRPA's tracing pass
    setup = time.perf_counter() - t0

    def bound(method):
        res = compute_bounds(sub, point["x"], job["eps"], method, intermediate="crown", device="cpu",
                             arithmetic=job.get("arithmetic", "float32"))
        return res.lower, res.upper                                   # (T, d) float64
    return {"setup_s": setup}, bound


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0      # Linux: KiB


def worker(job_path: str) -> None:
    """Set up once, then run the job's methods in order (cheap first); the result file is
    rewritten after each method so that a later OOM or timeout keeps the earlier ones."""
    with open(job_path) as f:
        job = json.load(f)
    torch.set_num_threads(job["threads"])
    cfg = Config(**{**job["config"], "eps": tuple(job["config"]["eps"])})
    info, bound = (gamma_setup if job["tool"] == "gamma" else lirpa_setup)(cfg, job)      # gamma: either arithmetic
    out = {**info, "methods": {}}
    for method in job["methods"]:
        rss0 = _maxrss_mb()
        t0 = time.perf_counter()
        lower, upper = bound(method)
        seconds = time.perf_counter() - t0
        out["methods"][method] = {"bound_s": seconds, "rss_before_mb": rss0, "peak_mb": _maxrss_mb(),
                                  "lower": lower, "upper": upper}
        torch.save(out, job["result"])


# ------------------------------------------------------------------ subprocess runner (parent)
def lirpa_available() -> tuple[bool, str]:
    """Import auto_LiRPA in a child (its import is slow and noisy); (ok, version or reason)."""
    code = "import auto_LiRPA; print(auto_LiRPA.__version__)"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or ["import failed"])[-1]
        return False, last
    return True, p.stdout.strip().splitlines()[-1]


def run_child(job: dict, folder: str, timeout: float, mem_bytes: int) -> dict:
    """Run one job (one tool, config and eps; its methods in order) in a fresh interpreter under
    the time and address-space limits.  Returns {method: result or {"failed": why}} plus "_run"
    (peak RSS from wait4, wall time, load average before and after)."""
    tag = f"{job['tool']}-{job.get('arithmetic', '')}-{job['eps']:g}"
    job_path, job["result"] = os.path.join(folder, tag + ".json"), os.path.join(folder, tag + ".pt")
    log_path = os.path.join(folder, tag + ".log")
    with open(job_path, "w") as f:
        json.dump(job, f)

    # the smaller of the cap and the memory free now: past it the kernel's OOM killer would pick
    # a process (on a shared machine, maybe another job's) instead of a clean MemoryError here
    load0, avail0 = os.getloadavg()[0], mem_available_gb()
    cap = min(mem_bytes, int(avail0 * 2**30)) if math.isfinite(avail0) else mem_bytes

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    env = dict(os.environ, PYTHONWARNINGS="ignore")
    with open(log_path, "w") as log:
        p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", job_path], stdout=log,
                             stderr=subprocess.STDOUT, preexec_fn=limit, env=env)
        t0, killed = time.perf_counter(), False
        while True:
            pid, status, usage = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if not killed and time.perf_counter() - t0 > timeout:
                os.kill(p.pid, signal.SIGKILL)
                killed = True
            time.sleep(0.05)
        p.returncode = os.waitstatus_to_exitcode(status)       # reaped here; keep Popen from waiting again
    run = {"peak_mb": usage.ru_maxrss / 1024.0, "wall_s": time.perf_counter() - t0,
           "load": (load0, os.getloadavg()[0]), "avail_gb": avail0, "cap_gb": cap / 2**30}
    with open(log_path) as f:
        log_text = f.read()
    done = torch.load(job["result"]) if os.path.exists(job["result"]) else {"methods": {}}
    why = None
    if killed:
        why = f"timeout after {timeout:.0f} s"
    elif p.returncode != 0:
        why = _failure(log_text, p.returncode, cap)
    if why is None and not all(m in done["methods"] for m in job["methods"]):
        why = f"exit 0 without results: {log_text.strip()[-200:]}"
    out: dict = {"_run": run}
    reported = False                         # the failure goes to the first method without a result
    for method in job["methods"]:
        if method in done["methods"]:
            out[method] = {**{k: v for k, v in done.items() if k != "methods"}, **done["methods"][method]}
        elif not reported:
            out[method] = {"failed": f"{why} [{run['avail_gb']:.1f} GiB of machine memory free at the worker's "
                                     "start]", "peak_mb": run["peak_mb"], "wall_s": run["wall_s"]}
            reported = True
        else:
            out[method] = {"skipped": "not run: the previous method failed"}
    return out


def mem_available_gb() -> float:
    try:
        with open("/proc/meminfo") as f:
            kb = next(int(ln.split()[1]) for ln in f if ln.startswith("MemAvailable:"))
        return kb / 2**20
    except (OSError, StopIteration, ValueError):
        return math.nan


def _failure(log: str, rc: int, cap: int) -> str:
    lines = [ln.strip() for ln in log.strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else ""
    m = re.search(r"tried to allocate (\d+) bytes", log)
    if m or "MemoryError" in log or "out of memory" in log:
        what = f": an allocation of {int(m.group(1)) / 2**20:.0f} MiB failed" if m else ""
        return f"out of memory at the {cap / 2**30:.1f} GiB address-space limit{what}"
    if rc == -signal.SIGKILL:
        return "killed by SIGKILL from outside this benchmark (the kernel's OOM killer?)"
    if rc < 0:
        return f"killed by signal {-rc}"
    return f"exit {rc}: {last[:200]}"


# ------------------------------------------------------------------ checks and table
def containment(graph, x: torch.Tensor, eps: float, lower: torch.Tensor, upper: torch.Tensor) -> tuple[int, int]:
    """(outputs outside [lower, upper], points checked): the centre, box corners and uniform samples,
    evaluated with gamma's float64 forward pass."""
    from gamma.ops import evaluate
    gen = torch.Generator().manual_seed(0)
    n = SAMPLES // 2
    corners = x + eps * (2 * torch.randint(0, 2, (n, *x.shape), generator=gen, dtype=torch.float64) - 1)
    uniform = x + eps * (2 * torch.rand((n, *x.shape), generator=gen, dtype=torch.float64) - 1)
    pts = torch.cat([x[None], corners, uniform])
    with torch.no_grad():
        ys = torch.cat([evaluate(graph, c) for c in torch.split(pts, 32)])
    bad = ((ys < lower) | (ys > upper)).reshape(len(pts), -1).any(1).sum()
    return int(bad), len(pts)


def widths(r: dict) -> tuple[float, float]:
    w = (r["upper"] - r["lower"]).double()
    return float(w.mean()), float(w.max())


def fmt(v, spec=".3g") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, Linux, Python {platform.python_version()}, torch {torch.__version__}"


def gamma_version() -> str:
    import gamma
    try:
        rev = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "gamma"], capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return f"gamma {gamma.__version__}"
    return f"gamma {gamma.__version__} (commit {rev}{', gamma/ modified' if dirty else ''})"


def table(rows: list[dict], lirpa: str, args, started: float) -> str:
    out = [f"### gamma vs auto_LiRPA on pre-LN Whisper encoder blocks ({'quick' if args.quick else 'full'} run)", "",
           f"Machine: {machine()}; {args.threads} torch threads per side. {gamma_version()}.",
           f"auto_LiRPA: {lirpa}. Limits per worker: {args.timeout:.0f} s wall; address space {args.mem_gb:g} GiB, "
           "or the machine's free memory at the worker's start when less.", "",
           "| block | eps | method | tool | setup s | bound s | peak RSS MB | bound RSS MB | mean width | max width "
           "| outside / points | load | status |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for tool in TOOLS:
            x = r.get(tool)
            if x is None:
                continue
            load = "-" if "load" not in x else f"{x['load'][0]:.1f}-{x['load'][1]:.1f}"
            head = f"| {r['label']} | {r['eps']:g} | {r['method']} | {SHOWN[tool]} |"
            if "failed" in x or "skipped" in x:
                status = x.get("failed") or x["skipped"]
                peak = fmt(x.get("peak_mb"), ".0f") if "failed" in x else "-"
                wall = f" after {x['wall_s']:.0f} s" if "failed" in x and not status.startswith("not run") else ""
                out.append(f"{head} - | - | {peak} | - | - | - | - | {load} | FAILED{wall}: {status} |"
                           if "failed" in x else f"{head} - | - | - | - | - | - | - | - | {status} |")
                continue
            mean, mx = widths(x)
            out.append(f"{head} {x['setup_s']:.2f} | {x['bound_s']:.2f} | {x['peak_mb']:.0f} | "
                       f"{max(0.0, x['peak_mb'] - x['rss_before_mb']):.0f} | {mean:.4g} | {mx:.4g} | "
                       f"{x['outside']} / {x['points']} | {load} | ok |")
    out += ["", "Ratios gamma / auto_LiRPA (time, memory, width: below 1 means gamma is faster / needs less / "
            "is tighter).", "",
            "| block | eps | method | bound time | setup + bound time | peak RSS | bound RSS | mean width | max width "
            "| mean width, both real arithmetic | max width, both real arithmetic |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    if all(r["auto_LiRPA"] is None for r in rows):
        out.append("| (no ratios: auto_LiRPA was not run) | | | | | | | | | | |")
    for r in rows:
        g, a, gr = r["gamma"], r["auto_LiRPA"], r.get("gamma-real")
        if not g or not a or "failed" in g or "skipped" in g:
            continue
        if "failed" in a or "skipped" in a:
            why = "auto_LiRPA failed" if "failed" in a else "auto_LiRPA not run"
            out.append(f"| {r['label']} | {r['eps']:g} | {r['method']} | {why} | | | | | | | |")
            continue
        (gm, gx), (am, ax) = widths(g), widths(a)
        real = "- | -"
        if gr and "failed" not in gr and "skipped" not in gr:
            rm, rx = widths(gr)
            real = f"{rm / am:.3g} | {rx / ax:.3g}"
        dg, da = g["peak_mb"] - g["rss_before_mb"], a["peak_mb"] - a["rss_before_mb"]
        total = (g["setup_s"] + g["bound_s"]) / (a["setup_s"] + a["bound_s"])
        out.append(f"| {r['label']} | {r['eps']:g} | {r['method']} | {g['bound_s'] / a['bound_s']:.3g} | "
                   f"{total:.3g} | {g['peak_mb'] / a['peak_mb']:.3g} | "
                   f"{fmt(dg / da) if dg > 0 and da > 0 else '-'} | {gm / am:.3g} | {gx / ax:.3g} | {real} |")
    out += ["", "Notes:",
            "* Same function, weights and box on both sides: the encoder blocks of a random Whisper saved with "
            "transformers' `save_pretrained` (every parameter perturbed, seed 1234); gamma builds its block graph "
            "from the checkpoint, auto_LiRPA bounds a torch module with the same weights whose float64 output "
            f"equals gamma's forward pass to {NOMINAL_TOL:g} (checked in every run). Box: L-inf radius eps around "
            "the nominal hidden state before the first block.",
            "* gamma's bounds include outward float32 rounding margins at every node (sound for a float32 engine); "
            "auto_LiRPA's do not (they bound the real-valued function and are computed in float32 without "
            "directed rounding). gamma computes in float64; auto_LiRPA runs in float32, its default.",
            "* 'gamma, real arithmetic' is the same gamma run with `arithmetic='real'` (`--arithmetic real`): no "
            "float32 margins, so it bounds what auto_LiRPA bounds, the real-valued function (gamma's own float32 "
            "products still charge their rounding). The 'both real arithmetic' ratios compare those widths; "
            "time and memory ratios are the default gamma run's.",
            "* gamma: `compute_bounds(graph, x, eps, method, intermediate='crown')` as `gamma verify` runs it. "
            "auto_LiRPA: `BoundedModule(net, x)`, `PerturbationLpNorm(norm=inf, eps)`, "
            "`compute_bounds(method='CROWN' | 'IBP')`, default bound options (GELU via auto_LiRPA's own `GELU` "
            "module; softmax, LayerNorm, matmul traced from torch).",
            "* One worker process per tool, config and eps: it sets up once, runs IBP, then CROWN. setup s: gamma "
            "loads the checkpoint and builds the graph; auto_LiRPA builds the module and the `BoundedModule`. "
            "bound s: the bound call alone (the 'bound time' ratio); 'setup + bound time' adds the setup.",
            "* peak RSS: the worker's `ru_maxrss` after the bound call (Python, torch and the library included; "
            "for a failed run, from `wait4`). bound RSS: peak RSS minus the worker's peak before the bound call "
            "(0 when the call stayed below an earlier peak).",
            f"* outside / points: points whose float64 output (gamma's forward pass) leaves the bounds, over the "
            f"centre, {SAMPLES // 2} box corners and {SAMPLES // 2} uniform samples.",
            "* auto_LiRPA's setup time is mostly `BoundGelu`'s precomputed tangent table (built per GELU node when "
            "the `BoundedModule` is created), so it does not grow with the block's width.",
            "* load: the machine's 1-minute load average before and after the worker (2 cores, shared with other "
            "jobs): times are wall-clock and shift with it.",
            f"* Total wall time of this benchmark: {(time.perf_counter() - started) / 60:.1f} min."]
    return "\n".join(out) + "\n"


def dominated(cfg: Config, failed: list[Config]) -> Config | None:
    """A failed config no larger than ``cfg`` in every dimension, if any."""
    for f in failed:
        if f.d <= cfg.d and f.tokens <= cfg.tokens and f.layers <= cfg.layers and f.ffn <= cfg.ffn:
            return f
    return None


# ------------------------------------------------------------------ main
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one 1-layer width-64 block at eps 1e-3")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "out", "autolirpa.md"))
    ap.add_argument("--timeout", type=float, default=600.0, help="wall-time limit per worker, seconds")
    ap.add_argument("--mem-gb", type=float, default=20.0, help="address-space limit per worker, GiB")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads per worker")
    ap.add_argument("--no-lirpa", action="store_true", help="run gamma's side only")
    ap.add_argument("--configs", help="comma-separated config names to run (default: all of the run)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return
    started = time.perf_counter()
    if args.no_lirpa:
        have, lirpa = False, "not run (--no-lirpa)"
    else:
        have, info = lirpa_available()
        lirpa = f"auto_LiRPA {info}" if have else f"NOT INSTALLED or not importable ({info}); its side is skipped"
    log = lambda msg: print(msg, file=sys.stderr, flush=True)      # noqa: E731
    log(lirpa)
    mem = int(args.mem_gb * 2**30)
    rows, failed = [], {}                    # (tool, method) -> configs it failed on
    configs = QUICK if args.quick else FULL
    if args.configs:
        pool = {c.name: c for c in QUICK + FULL}
        unknown = [n for n in args.configs.split(",") if n not in pool]
        if unknown:
            ap.error(f"unknown config {', '.join(unknown)} (choose from {', '.join(pool)})")
        configs = [pool[n] for n in args.configs.split(",")]
    for cfg in configs:
        label = f"{cfg.name} ({cfg.label})"
        with tempfile.TemporaryDirectory(prefix="gamma-autolirpa-") as folder:
            prep = prepare(cfg, folder)
            results = {}
            for tool in TOOLS:
                if tool == "auto_LiRPA" and not have:
                    continue
                dead = {}                        # method -> why it is not run at the larger eps
                for m in METHODS:
                    smaller = dominated(cfg, failed.get((tool, m), []))
                    if smaller is not None:
                        dead[m] = f"not run: {tool} {m} failed on the smaller {smaller.name}"
                for eps in cfg.eps:
                    res = {m: {"skipped": dead[m]} for m in METHODS if m in dead}
                    todo = [m for m in METHODS if m not in dead]
                    if todo:
                        job = {"tool": "lirpa" if tool == "auto_LiRPA" else "gamma", "methods": todo, "eps": eps,
                               "arithmetic": "real" if tool == "gamma-real" else "float32",
                               "ckpt": prep["ckpt"], "point": prep["point"], "threads": args.threads,
                               "config": cfg.__dict__ | {"eps": list(cfg.eps)}}
                        ran = run_child(job, folder, args.timeout, mem)
                        run = ran.pop("_run")
                        for method, r in ran.items():
                            res[method] = r
                            if "skipped" in r:
                                continue
                            r["load"] = run["load"]
                            if "failed" in r:
                                failed.setdefault((tool, method), []).append(cfg)
                                dead[method] = f"not run: {tool} {method} failed at eps {eps:g}"
                                log(f"{cfg.name} eps={eps:g} {method} {tool}: FAILED {r['failed']} "
                                    f"(peak {r['peak_mb']:.0f} MB, {r['wall_s']:.0f} s)")
                                continue
                            r["outside"], r["points"] = containment(prep["graph"], prep["x"], eps, r["lower"],
                                                                    r["upper"])
                            mean, mx = widths(r)
                            log(f"{cfg.name} eps={eps:g} {method} {tool}: setup {r['setup_s']:.1f}s bound "
                                f"{r['bound_s']:.2f}s peak {r['peak_mb']:.0f} MB mean width {mean:.4g} "
                                f"max {mx:.4g} outside {r['outside']}/{r['points']}")
                    results[tool, eps] = res
        for eps in cfg.eps:
            for method in METHODS:
                rows.append({"label": label, "eps": eps, "method": method,
                             **{t: results[t, eps][method] if (t, eps) in results else None
                                for t in TOOLS}})
    text = table(rows, lirpa, args, started)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump({"machine": machine(), "gamma": gamma_version(), "auto_LiRPA": lirpa, "rows": plain(rows)}, f,
                  indent=1)
    print(text)


def plain(rows: list[dict]) -> list[dict]:
    """Rows without tensors: widths instead of bounds (JSON)."""
    out = []
    for r in rows:
        row = {k: r[k] for k in ("label", "eps", "method")}
        for tool in TOOLS:
            x = r.get(tool)
            if x is None:
                row[tool] = None
                continue
            x = {k: v for k, v in x.items() if k not in ("lower", "upper")}
            if "lower" in r[tool]:
                x["mean_width"], x["max_width"] = widths(r[tool])
            row[tool] = x
        out.append(row)
    return out


if __name__ == "__main__":
    main()

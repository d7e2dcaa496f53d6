"""Run a VNN-COMP benchmark folder: ``run_benchmark(dir, every=K)``.

The folder holds ``instances.csv`` (rows ``onnx,vnnlib,timeout``, paths
relative to the folder; ``FILE.gz`` is used where ``FILE`` is missing).
Every selected instance runs as ``gamma verify ONNX --vnnlib PROP --json``
in its own process, killed :data:`GRACE` seconds after its timeout (the
loading of torch and of the model counts against the instance, as in
VNN-COMP).  A decision reached after the timeout counts as ``timeout``.

Rows are VNN-COMP's ``benchmark,onnx,vnnlib,prepare_time,result,run_time``
(prepare time 0: gamma has no separate preparation step), appended to the
output CSV as each instance finishes.  The summary compares with a
published results CSV of the same rows (e.g. alpha-beta-CROWN's).
"""

from __future__ import annotations

import csv
import glob
import json
import os
import subprocess
import sys
import time
from typing import Callable, Optional

from .errors import GammaError

GRACE = 30.0                 # seconds past an instance's timeout before its process is killed
RESULTS = ("unsat", "sat", "unknown", "timeout", "error")


def _resolve(folder: str, rel: str) -> str:
    path = os.path.join(folder, rel)
    if os.path.exists(path):
        return path
    if os.path.exists(path + ".gz"):
        return path + ".gz"
    raise GammaError(f"{path}: no such file (nor {os.path.basename(path)}.gz)")


def read_instances(folder: str) -> list:
    """[(onnx path, vnnlib path, timeout seconds)] from ``folder/instances.csv``."""
    path = os.path.join(folder, "instances.csv")
    if not os.path.isfile(path):
        raise GammaError(f"{folder}: no instances.csv")
    out = []
    with open(path, newline="") as f:
        for n, row in enumerate(csv.reader(f), 1):
            if not row or not "".join(row).strip():
                continue
            if len(row) != 3:
                raise GammaError(f"{path}:{n}: expected onnx,vnnlib,timeout")
            try:
                timeout = float(row[2])
            except ValueError:
                raise GammaError(f"{path}:{n}: timeout '{row[2]}' is not a number") from None
            out.append((_resolve(folder, row[0].strip()), _resolve(folder, row[1].strip()), timeout))
    if not out:
        raise GammaError(f"{path}: no instances")
    return out


def _key(onnx: str, vnnlib: str) -> tuple:
    strip = lambda p: os.path.basename(p)[:-3] if p.endswith(".gz") else os.path.basename(p)
    return strip(onnx), strip(vnnlib)


def read_reference(path: str) -> dict:
    """{(onnx name, vnnlib name): (result, run time)} from a VNN-COMP results CSV."""
    out = {}
    with open(path, newline="") as f:
        for row in csv.reader(f):
            if len(row) >= 6:
                try:
                    t = float(row[5])
                except ValueError:
                    continue                      # a header
                out[_key(row[1], row[2])] = (row[4].strip(), t)
    return out


def run_instance(onnx: str, vnnlib: str, timeout: float) -> dict:
    """One instance in its own process: {"result", "run_time", "detail"}."""
    cmd = [sys.executable, "-m", "gamma", "verify", onnx, "--vnnlib", vnnlib, "--timeout", repr(timeout),
           "--json", "--quiet"]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + GRACE)
    except subprocess.TimeoutExpired:
        return {"result": "timeout", "run_time": time.perf_counter() - t0, "detail": "killed"}
    run_time = time.perf_counter() - t0
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or ["exit status %d" % p.returncode])[-1]
        return {"result": "error", "run_time": run_time, "detail": last}
    try:
        data = json.loads(p.stdout)
    except json.JSONDecodeError:
        return {"result": "error", "run_time": run_time, "detail": "no JSON on stdout"}
    result = data.get("result", "error")
    if result in ("unsat", "sat") and (data.get("over_time") or run_time > timeout + GRACE):
        result = "timeout"
    return {"result": result, "run_time": run_time, "detail": data}


def _default_reference(folder: str) -> Optional[str]:
    found = sorted(glob.glob(os.path.join(folder, "results-*.csv")))
    return found[0] if found else None


def run_benchmark(folder: str, every: int = 1, out: Optional[str] = None, reference: Optional[str] = None,
                  timeout_scale: float = 1.0, log: Optional[Callable[[str], None]] = None,
                  limit: Optional[int] = None) -> dict:
    """Run every ``every``-th instance (0, K, 2K, ...; the first ``limit`` of them);
    returns the report (plain data)."""
    instances = read_instances(folder)
    chosen = instances[::every][:limit]
    bench = os.path.basename(os.path.normpath(folder))
    reference = reference or _default_reference(folder)
    ref = read_reference(reference) if reference else {}
    rows = []
    f = open(out, "w", newline="") if out else None
    try:
        writer = csv.writer(f) if f else None
        for k, (onnx, vnnlib, timeout) in enumerate(chosen, 1):
            t = timeout * timeout_scale
            r = run_instance(onnx, vnnlib, t)
            name = _key(onnx, vnnlib)
            row = {"benchmark": bench, "onnx": name[0], "vnnlib": name[1], "timeout": t, "result": r["result"],
                   "run_time": round(r["run_time"], 3), "reference": ref.get(name, (None, None))[0],
                   "reference_time": ref.get(name, (None, None))[1]}
            if r["result"] == "error":
                row["error"] = r["detail"]
            elif isinstance(r["detail"], dict):
                row["phases"] = r["detail"].get("phases", [])
            rows.append(row)
            if writer:
                writer.writerow([bench, name[0], name[1], 0, r["result"], row["run_time"]])
                f.flush()
            if log:
                log(f"[{k}/{len(chosen)}] {name[1]}: {r['result']} in {r['run_time']:.1f} s"
                    + (f" (reference: {row['reference']})" if row["reference"] else ""))
    finally:
        if f:
            f.close()
    return {"benchmark": bench, "folder": folder, "every": every, "instances": len(instances),
            "run": len(rows), "reference": reference, "rows": rows, "summary": summarize(rows)}


def summarize(rows: list) -> dict:
    ours = {r: sum(1 for x in rows if x["result"] == r) for r in RESULTS}
    matched = [x for x in rows if x["reference"]]
    theirs = {}
    for x in matched:
        theirs[x["reference"]] = theirs.get(x["reference"], 0) + 1
    conflicts = [x["vnnlib"] for x in matched if {x["result"], x["reference"]} == {"sat", "unsat"}]
    both = sum(1 for x in matched if x["result"] == "unsat" and x["reference"] == "unsat")
    times = [x["run_time"] for x in rows if x["result"] in ("unsat", "sat")]
    return {"ours": ours, "reference": theirs, "matched": len(matched), "conflicts": conflicts,
            "unsat_both": both, "mean_decided_time": sum(times) / len(times) if times else None}


def summary_lines(report: dict) -> list:
    s = report["summary"]
    ref_name = os.path.basename(report["reference"]) if report["reference"] else "reference"
    out = [f"{report['benchmark']}: {report['run']} of {report['instances']} instances (every {report['every']})",
           "", f"| result | gamma | {ref_name} (same instances) |", "|---|---|---|"]
    for r in RESULTS:
        theirs = s["reference"].get(r, 0) if s["matched"] else "-"
        out.append(f"| {r} | {s['ours'][r]} | {theirs} |")
    out.append("")
    out.append(f"verified by both: {s['unsat_both']}; sat/unsat disagreements: "
               + (", ".join(s["conflicts"]) if s["conflicts"] else "none"))
    if s["mean_decided_time"] is not None:
        out.append(f"mean time of decided instances: {s['mean_decided_time']:.1f} s")
    return out

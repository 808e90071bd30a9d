"""Scale on paper: step time against workers for sync SGD and EASGD (sync and async).

    python benchmarks/scale_model.py                      # the tables (markdown) in RESULTS.md
    python benchmarks/scale_model.py --json scale.json    # and every number
    python benchmarks/scale_model.py --check runs/bench/baselines_np2.json runs/bench/baselines_np3.json

The model (every assumption is a flag; the defaults are stated in the output):

- **Ring allreduce** of ``B`` bytes over ``p`` workers, link bandwidth ``bw`` (bytes/s) and
  per-message latency ``a``:  ``T_ar = 2 (p-1)/p * B / bw + 2 (p-1) * a``.
- **Compute** per step ``t_c = batch / (one GPU's training throughput)``; ResNet-50 (25.56 M
  parameters, 102.2 MB in fp32) on NVIDIA's published single-GPU PyTorch numbers
  (DeepLearningExamples, ResNet-50 v1.5): V100 FP32 367 img/s, A100 AMP 2470 img/s; batch 64.
- **Sync SGD** (``hvd.DistributedOptimizer``/DDP): a gradient allreduce every step, of which
  at most ``overlap * t_c`` hides behind the backward pass:
  ``t = t_c + max(0, T_ar - overlap * t_c)`` (default overlap 0.5).
- **EASGD sync**: one parameter allreduce every ``tau`` steps, plus the round's local math
  ``t_m`` (``passes`` elementwise passes over the parameters at the GPU's memory bandwidth) and
  the wait for Horovod's next background cycle, on average half of ``HOROVOD_CYCLE_TIME``
  (``t_s``). The allreduce starts when the step before the round step ends
  (``start_early``), so up to one step of compute ``t_c`` hides it:
  ``t = t_c + (t_m + max(0, t_s + T_ar - t_c)) / tau`` (ResNet-50's BatchNorm statistics
  included: they go as they were before the round step's forward). With
  ``start_early=False`` nothing hides it: ``t = t_c + (T_ar + t_m + t_s) / tau``.
- **EASGD async**: the exchange runs on a background thread while training goes on; it is
  hidden when ``t_s + T_ar <= tau * t_c``; otherwise training waits for the rest:
  ``t = t_c + (t_m + max(0, t_s + T_ar - tau * t_c)) / tau``. The smallest ``tau`` that hides
  the exchange is ``ceil((t_s + T_ar) / t_c)``.
- Efficiency = ``t_c / t`` (1 = compute-bound, linear scaling); throughput = ``p * batch / t``.

What it leaves out (so read the numbers as a lower bound on communication cost): NCCL/Gloo
reaching less than line rate, several GPUs sharing one NIC, hierarchical (NVLink inside a
node) allreduce, the GPU time the collective itself uses, stragglers, and accuracy: EASGD at a
large tau needs more steps to reach the same error than sync SGD (the paper's figures; see
``benchmarks/accuracy.py``). This model only says how fast the steps are.

``--check`` tests the same formulas on this machine: it measures Horovod's Gloo allreduce over
loopback at 2 and 3 workers (``horovodrun``; a least-squares fit of ``a`` and ``bw``), takes
the compute time per step from the physical-limit row of ``benchmarks/baselines.py``'s JSON
at the same worker count, predicts every row and prints prediction against measurement.
On a CPU the "hidden" communication is not free (the collective's copies and sums run on the
cores that train), so it gives two predictions: the model as above (ideal overlap), and with
the allreduce fully exposed (no overlap, the cores are saturated); the measurement should lie
between them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]

RESNET50_PARAMS = 25_557_032  # torchvision resnet50


@dataclass(frozen=True)
class Gpu:
    name: str
    images_per_sec: float   # one GPU, training, ResNet-50
    mem_bandwidth: float    # bytes/s, for the round's elementwise math
    source: str


@dataclass(frozen=True)
class Network:
    name: str
    bandwidth: float        # bytes/s per worker's link
    latency: float          # seconds per ring step (message)


GPUS = {
    "v100-fp32": Gpu("V100 16GB, FP32", 367.0, 900e9,
                     "NVIDIA DeepLearningExamples ResNet-50 v1.5 (PyTorch), 1 GPU"),
    "a100-amp": Gpu("A100 80GB, AMP", 2470.0, 2.0e12,
                    "NVIDIA DeepLearningExamples ResNet-50 v1.5 (PyTorch), 1 GPU"),
}
NETWORKS = {
    "25g": Network("25 Gb/s Ethernet (TCP)", 25e9 / 8, 25e-6),
    "100g": Network("100 Gb/s InfiniBand/RoCE", 100e9 / 8, 5e-6),
}


# ================================================================================ formulas


def ring_allreduce_seconds(nbytes: float, p: int, bandwidth: float, latency: float) -> float:
    """``2 (p-1)/p * B / bw + 2 (p-1) * a``; zero for one worker."""
    if p <= 1:
        return 0.0
    return 2.0 * (p - 1) / p * nbytes / bandwidth + 2.0 * (p - 1) * latency


def sync_sgd_step(t_c: float, t_ar: float, overlap: float) -> float:
    """Allreduce every step; up to ``overlap * t_c`` of it hides behind the backward pass."""
    return t_c + max(0.0, t_ar - overlap * t_c)


def easgd_sync_step(t_c: float, t_ar: float, tau: int, t_math: float = 0.0,
                    t_start: float = 0.0, hidden: float = 0.0) -> float:
    """A round (start delay, allreduce, local math) every ``tau`` steps, of which up to
    ``hidden`` seconds of the exchange run behind compute (one step's with ``start_early``)."""
    return t_c + (t_math + max(0.0, t_start + t_ar - hidden)) / tau


def easgd_async_step(t_c: float, t_ar: float, tau: int, t_math: float = 0.0,
                     t_start: float = 0.0) -> float:
    """The exchange overlaps ``tau`` steps of compute; training waits only for the excess."""
    return t_c + (t_math + max(0.0, t_start + t_ar - tau * t_c)) / tau


def hiding_tau(t_c: float, t_ar: float, t_start: float = 0.0) -> int:
    """The smallest tau at which async EASGD hides the exchange entirely."""
    return max(1, math.ceil((t_start + t_ar) / t_c - 1e-12))


def round_math_seconds(nbytes: float, mem_bandwidth: float, passes: float) -> float:
    return passes * nbytes / mem_bandwidth


# ================================================================================ paper tables


def scale_table(gpu: Gpu, net: Network, args: argparse.Namespace) -> Dict[str, Any]:
    nbytes = args.params * args.bytes_per_param
    t_c = args.batch / gpu.images_per_sec
    t_m = round_math_seconds(nbytes, gpu.mem_bandwidth, args.math_passes)
    t_s_easgd = args.easgd_cycle_ms / 2e3
    t_s_sgd = args.sgd_cycle_ms / 2e3
    rows = []
    for p in args.workers:
        t_ar = ring_allreduce_seconds(nbytes, p, net.bandwidth, net.latency)
        row: Dict[str, Any] = {"p": p, "allreduce_ms": 1e3 * t_ar, "compute_ms": 1e3 * t_c}
        t_sgd = sync_sgd_step(t_c, t_ar + t_s_sgd, args.overlap)
        row["sync_sgd"] = {"step_ms": 1e3 * t_sgd, "efficiency": t_c / t_sgd,
                           "images_per_sec": p * args.batch / t_sgd}
        steps = {  # tau -> step time; a sync round hides behind one step (start_early)
            "easgd_sync": lambda tau: easgd_sync_step(t_c, t_ar, tau, t_m, t_s_easgd, t_c),
            "easgd_async": lambda tau: easgd_async_step(t_c, t_ar, tau, t_m, t_s_easgd)}
        for mode, step_time in steps.items():
            row[mode] = {}
            for tau in args.taus:
                t = step_time(tau)
                row[mode][tau] = {"step_ms": 1e3 * t, "efficiency": t_c / t,
                                  "images_per_sec": p * args.batch / t}
        row["hiding_tau"] = hiding_tau(t_c, t_ar, t_s_easgd)
        rows.append(row)
    return {"gpu": asdict(gpu), "network": asdict(net), "compute_ms": 1e3 * t_c,
            "round_math_ms": 1e3 * t_m, "bytes": nbytes, "rows": rows}


def render_scale(table: Dict[str, Any], args: argparse.Namespace) -> str:
    from benchmarks.common import format_table

    g, n = table["gpu"], table["network"]
    headers = (["p", "allreduce ms", "sync SGD"] + [f"sync tau={t}" for t in args.taus]
               + [f"async tau={t}" for t in args.taus] + ["tau hiding it (async)",
                                                          "sync SGD img/s",
                                                          f"async tau={args.taus[-2]} img/s"])
    body = []
    for r in table["rows"]:
        body.append([r["p"], r["allreduce_ms"], _pct(r["sync_sgd"]["efficiency"]),
                     *(_pct(r["easgd_sync"][t]["efficiency"]) for t in args.taus),
                     *(_pct(r["easgd_async"][t]["efficiency"]) for t in args.taus),
                     r["hiding_tau"], r["sync_sgd"]["images_per_sec"],
                     r["easgd_async"][args.taus[-2]]["images_per_sec"]])
    return "\n".join([
        f"### {g['name']} ({g['images_per_sec']:g} img/s: {table['compute_ms']:.1f} ms per step "
        f"at batch {args.batch}), {n['name']} ({n['bandwidth'] * 8 / 1e9:g} Gb/s, "
        f"{n['latency'] * 1e6:g} us per message)", "",
        f"Efficiency (compute time / step time) per method; round math {table['round_math_ms']:.2f}"
        f" ms. ", "", format_table(headers, body), ""])


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def verdict(tables: List[Dict[str, Any]], args: argparse.Namespace) -> List[str]:
    """Plain-language reading of the tables: where EASGD pays off, which tau hides it."""
    lines = []
    for table in tables:
        g, n = table["gpu"]["name"], table["network"]["name"]
        sgd_bad = [r["p"] for r in table["rows"] if r["sync_sgd"]["efficiency"] < 0.9]
        first = sgd_bad[0] if sgd_bad else None
        hide = {r["p"]: r["hiding_tau"] for r in table["rows"]}
        sync16 = {r["p"]: r["easgd_sync"][16]["efficiency"] for r in table["rows"]} \
            if 16 in args.taus else {}
        if first is None:
            pays = (f"sync SGD stays at >= 90% efficiency up to p = {args.workers[-1]}: EASGD "
                    "buys little speed here")
        else:
            sgd_eff = next(r["sync_sgd"]["efficiency"] for r in table["rows"] if r["p"] == first)
            pays = (f"sync SGD drops below 90% from p = {first} ({100 * sgd_eff:.0f}%): EASGD pays "
                    "off from there")
        lines.append(
            f"- {g}, {n}: {pays}; async hides the exchange from tau = "
            + ", ".join(f"{hide[p]} (p={p})" for p in args.workers)
            + (("; sync at tau = 16 keeps " + ", ".join(
                f"{100 * sync16[p]:.0f}% (p={p})" for p in (args.workers[0], args.workers[-1])))
               if sync16 else "") + ".")
    return lines


# ================================================================================ --check


def probe_worker(args: argparse.Namespace) -> None:
    """Under horovodrun: time Horovod's allreduce at several sizes and one elementwise pass."""
    import horovod.torch as hvd
    import torch

    torch.set_num_threads(1)
    hvd.init()
    sizes = sorted({8, 64 * 1024, 1 << 20, 8 << 20, 32 << 20, int(args.probe_bytes)})
    out: Dict[str, Any] = {"size": hvd.size(), "allreduce": {}}
    for nbytes in sizes:
        t = torch.ones(max(1, nbytes // 4), dtype=torch.float32)
        reps = 30 if nbytes <= (1 << 20) else 5
        times = []
        for i in range(reps + 1):
            hvd.barrier()
            t0 = time.perf_counter()
            hvd.allreduce(t, name=f"probe.{nbytes}", op=hvd.Sum)
            times.append(time.perf_counter() - t0)
        slowest = hvd.allreduce(torch.tensor([statistics.median(times[1:])],
                                             dtype=torch.float64), op=hvd.Max,
                                name=f"probe.max.{nbytes}")
        out["allreduce"][str(t.numel() * 4)] = float(slowest[0])
    # One elementwise pass over a parameter-sized buffer (a.add_(b, alpha)), one thread.
    a = torch.ones(int(args.probe_bytes) // 4)
    b = torch.ones_like(a)
    passes = []
    for _ in range(5):
        t0 = time.perf_counter()
        a.add_(b, alpha=0.5)
        passes.append(time.perf_counter() - t0)
    out["pass_seconds"] = statistics.median(passes)
    if hvd.rank() == 0:
        Path(args.out).write_text(json.dumps(out))
    hvd.barrier()


def fit_alpha_beta(points: Dict[int, float], p: int) -> Dict[str, float]:
    """Least squares of ``T = 2(p-1) a + 2(p-1)/p * B / bw`` over (B, T) points."""
    xs = [2.0 * (p - 1) / p * b for b in points]
    ys = list(points.values())
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx  # 1 / bw
    intercept = my - slope * mx                                     # 2 (p-1) a
    return {"bandwidth": 1.0 / slope, "latency": max(0.0, intercept) / (2.0 * (p - 1))}


def run_probe(p: int, nbytes: int, cycle_ms: float) -> Dict[str, Any]:
    hvdrun = Path(sys.executable).with_name("horovodrun")
    env = dict(os.environ, OMP_NUM_THREADS="1", HOROVOD_CYCLE_TIME=f"{cycle_ms:g}",
               PYTHONPATH=os.pathsep.join(x for x in (str(REPO), os.environ.get("PYTHONPATH"))
                                          if x))
    env.pop("HOROVOD_RANK", None)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "probe.json"
        cmd = [str(hvdrun) if hvdrun.exists() else "horovodrun", "-np", str(p), "-H",
               f"localhost:{p}", "--gloo", "--start-timeout", "120", sys.executable,
               str(Path(__file__).resolve()), "--probe", "--probe-bytes", str(nbytes),
               "--out", str(out)]
        proc = subprocess.run(cmd, cwd=str(REPO), env=env, capture_output=True, text=True,
                              timeout=600)
        if proc.returncode != 0:
            raise SystemExit(f"probe failed: {proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def check(args: argparse.Namespace) -> Dict[str, Any]:
    """Predict the rows of baselines.py JSONs from a loopback probe; compare."""
    results = []
    for path in args.check:
        payload = json.loads(Path(path).read_text())
        cfg = payload["config"]
        p, batch, nbytes = cfg["np"], cfg["batch"], cfg["param_bytes"]
        rows = {r["name"]: r for r in payload["rows"]}
        limit = rows["plain-nocomm"]["median_samples_per_sec"]
        t_c = batch * p / limit  # seconds per step of every worker
        probe = run_probe(p, nbytes, args.probe_cycle_ms)
        points = {int(b): t for b, t in probe["allreduce"].items()}
        fit = fit_alpha_beta(points, p)
        t_ar = ring_allreduce_seconds(nbytes, p, fit["bandwidth"], fit["latency"])
        t_m = args.check_math_passes * probe["pass_seconds"]
        cycle = {job: float(s.get("HOROVOD_CYCLE_TIME", 1))
                 for job, s in payload.get("horovod_settings", {}).items()}
        preds = []
        for name, row in rows.items():
            base = name.split("@")[0]
            tau = row.get("tau") or 1
            t_s_easgd = _cycle_of(name, cycle) / 2e3  # half a cycle: an EASGD round's start
            if name.startswith("hvd-sgd") or base == "torch-ddp":
                t_s = 0.0 if base == "torch-ddp" else cycle.get("hvd-default", 1.0) / 2e3
                ideal = sync_sgd_step(t_c, t_ar + t_s, args.check_overlap)
                exposed = sync_sgd_step(t_c, t_ar + t_s, 0.0)
            elif base.startswith("torch-averager"):
                ideal = exposed = easgd_sync_step(t_c, t_ar, tau, args.check_math_passes / 2
                                                  * probe["pass_seconds"], 0.0)
            elif base.startswith("easgd-synclate"):
                ideal = exposed = easgd_sync_step(t_c, t_ar, tau, t_m, t_s_easgd)
            elif base.startswith("easgd-sync"):  # started a step early: hides behind one step
                ideal = easgd_sync_step(t_c, t_ar, tau, t_m, t_s_easgd, hidden=t_c)
                exposed = easgd_sync_step(t_c, t_ar, tau, t_m, 0.0)
            elif base.startswith("easgd-async"):
                ideal = easgd_async_step(t_c, t_ar, tau, t_m, t_s_easgd)
                exposed = easgd_sync_step(t_c, t_ar, tau, t_m, 0.0)
            else:
                continue
            measured = row["median_samples_per_sec"]
            hi, lo = p * batch / ideal, p * batch / exposed
            preds.append({"name": name, "measured": measured, "predicted_ideal": hi,
                          "predicted_exposed": lo,
                          "within": lo * (1 - args.tolerance) <= measured
                          <= hi * (1 + args.tolerance),
                          "error_vs_ideal": measured / hi - 1})
        results.append({"json": str(path), "p": p, "batch": batch, "param_bytes": nbytes,
                        "compute_ms": 1e3 * t_c, "fit": fit, "allreduce_ms": 1e3 * t_ar,
                        "probe": probe, "round_math_ms": 1e3 * t_m, "rows": preds})
    return {"check": results, "tolerance": args.tolerance}


def _cycle_of(name: str, cycle: Dict[str, float]) -> float:
    if "@cycle" in name:
        return float(name.split("@cycle", 1)[1].rstrip("ms"))
    return cycle.get("hvd-easgd", 20.0)


def render_check(result: Dict[str, Any]) -> str:
    from benchmarks.common import format_table

    lines = ["## Prediction against measurement on this machine", ""]
    for r in result["check"]:
        f = r["fit"]
        lines += [
            f"### p = {r['p']} ({r['json']})", "",
            f"Compute {r['compute_ms']:.1f} ms/step (the physical-limit row), loopback Gloo fit: "
            f"{f['bandwidth'] * 8 / 1e9:.2f} Gb/s, {f['latency'] * 1e6:.0f} us per message: "
            f"allreduce of {r['param_bytes'] / 2**20:.1f} MiB {r['allreduce_ms']:.0f} ms "
            f"(probe measured {1e3 * r['probe']['allreduce'].get(str(r['param_bytes']), float('nan')):.0f}"
            f" ms); round math {r['round_math_ms']:.0f} ms.", "",
            format_table(["row", "measured samples/s", "predicted (ideal overlap)",
                          "predicted (exposed)", "measured / ideal", "in range"],
                         [[x["name"], x["measured"], x["predicted_ideal"],
                           x["predicted_exposed"], 1 + x["error_vs_ideal"], x["within"]]
                          for x in r["rows"]]), ""]
    return "\n".join(lines)


# ================================================================================ CLI


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--gpus", nargs="+", default=list(GPUS), choices=list(GPUS))
    p.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=list(NETWORKS))
    p.add_argument("--workers", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256])
    p.add_argument("--taus", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--batch", type=int, default=64, help="per-GPU batch")
    p.add_argument("--params", type=int, default=RESNET50_PARAMS)
    p.add_argument("--bytes-per-param", type=int, default=4)
    p.add_argument("--overlap", type=float, default=0.5,
                   help="sync SGD: share of the compute time the gradient allreduce can hide "
                        "behind (the backward pass, minus the last buckets)")
    p.add_argument("--math-passes", type=float, default=8,
                   help="EASGD round: elementwise passes over the parameters (read+write each)")
    p.add_argument("--easgd-cycle-ms", type=float, default=None,
                   help="HOROVOD_CYCLE_TIME of EASGD jobs (default: hvd_easgd.optim.tuning's)")
    p.add_argument("--sgd-cycle-ms", type=float, default=1.0,
                   help="HOROVOD_CYCLE_TIME of the sync SGD job (Horovod's default)")
    p.add_argument("--json", default=None)
    p.add_argument("--check", nargs="+", default=None, metavar="BASELINES_JSON",
                   help="compare with baselines.py JSONs measured on this machine")
    p.add_argument("--probe-cycle-ms", type=float, default=0.2,
                   help="HOROVOD_CYCLE_TIME during the loopback probe (short: network only)")
    p.add_argument("--check-overlap", type=float, default=0.5)
    p.add_argument("--check-math-passes", type=float, default=4,
                   help="elementwise passes of an EASGD round on this machine (the averager: half)")
    p.add_argument("--tolerance", type=float, default=0.10,
                   help="--check: slack around the [exposed, ideal] range")
    p.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--probe-bytes", type=int, default=4 * 25_200_000, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.easgd_cycle_ms is not None:
        return args
    from hvd_easgd.optim import HOROVOD_SETTINGS

    return argparse.Namespace(**{**vars(args), "easgd_cycle_ms": float(
        HOROVOD_SETTINGS.get("HOROVOD_CYCLE_TIME", 1))})


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    if args.probe:
        probe_worker(args)
        return {}
    if args.check:
        result = check(args)
        print(render_check(result))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
        return result
    tables = [scale_table(GPUS[g], NETWORKS[n], args) for g in args.gpus for n in args.networks]
    lines = [
        f"## Step time against workers, on paper: ResNet-50 ({args.params / 1e6:.2f} M "
        f"parameters, {args.params * args.bytes_per_param / 1e6:.1f} MB), batch {args.batch} per GPU",
        "",
        f"Ring allreduce 2(p-1)/p B/bw + 2(p-1) a; sync SGD hides up to {args.overlap:g} of the "
        f"compute time; EASGD waits on average half a Horovod cycle "
        f"({args.easgd_cycle_ms:g} ms) per round and does {args.math_passes:g} elementwise passes "
        "over the parameters; one NIC per GPU; line-rate bandwidth.", ""]
    for table in tables:
        lines.append(render_scale(table, args))
    lines += ["Reading:", *verdict(tables, args)]
    print("\n".join(lines))
    payload = {"assumptions": {k: v for k, v in vars(args).items()
                               if k not in ("probe", "out", "check", "json")},
               "tables": tables}
    if args.json:
        Path(args.json).write_text(json.dumps(payload, indent=2))
    return payload


if __name__ == "__main__":
    main()

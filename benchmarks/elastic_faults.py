"""Lose a worker on Horovod's own elastic example, before it has converged: sync SGD against
hvd_easgd.

Horovod's ``examples/elastic/pytorch/pytorch_mnist_elastic.py`` runs unchanged (``sync-sgd``,
i.e. ``hvd.DistributedOptimizer``) and with its ``hvd.DistributedOptimizer(`` call swapped for
``hvd_easgd.DistributedOptimizer(`` (``easgd-sync``, ``easgd-async``; ``--swap NAME=KWARGS``
adds a variant with more keywords, e.g. ``--swap 'center=mode="sync", survivors="center"'``).

Every run is an elastic ``horovodrun -np 2 --min-np 1 --max-np 2`` whose discovery script lists
``localhost:1`` and ``127.0.0.1:1`` (two "hosts" on this machine), at the script's own defaults
(10 epochs, lr 0.01 x workers, momentum 0.5). Each variant runs three ways: with no fault; with
the worker on ``127.0.0.1`` SIGKILLed as soon as a worker prints ``Train Epoch: E``
(``--kill-epoch``); and with no fault for ``E - 1`` epochs, whose final accuracy is the model's
accuracy at the moment of the kill. MNIST cannot be downloaded here, so scikit-learn's digits
are written as MNIST files (8x8 resized to 28x28; by default 297 test images and the other 1500
for training, no extra copies: the model is far from converged when the kill falls). The script
is read from a Horovod checkout (``--example``); nothing of it is stored in this repository.

    git clone https://github.com/horovod/horovod /tmp/horovod
    python benchmarks/elastic_faults.py \\
        --example /tmp/horovod/examples/elastic/pytorch/pytorch_mnist_elastic.py --reps 3

Prints a markdown table (the test accuracy the script prints at the end, per repetition, and
the median) and writes every number with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

REPO = Path(__file__).resolve().parents[1]
HORovod_CALL = "hvd.DistributedOptimizer("
VARIANTS = {
    "sync-sgd": None,
    "easgd-sync": 'import hvd_easgd; optimizer = hvd_easgd.DistributedOptimizer(mode="sync", optimizer=',
    "easgd-async": 'import hvd_easgd; optimizer = hvd_easgd.DistributedOptimizer(mode="async", optimizer=',
}
ACCURACY = re.compile(r"Accuracy: ([0-9.]+)%")


def write_digits_as_mnist(root: Path, train_copies: int, test_size: int = 360) -> None:
    """scikit-learn's digits in MNIST's raw file format under ``root/MNIST/raw``.

    ``test_size`` images (a fixed permutation, seed 0) form the test set; the other
    ``1797 - test_size`` are the training set, ``train_copies`` times (copies after the first
    shifted by up to 2 pixels). ``test_size=297, train_copies=1``: 1500 training images.
    """
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    images = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    images = F.interpolate(images, size=(28, 28), mode="bilinear", align_corners=False)
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8).view(-1, 28, 28).numpy()
    order = np.random.default_rng(0).permutation(len(y))
    test, train = order[:test_size], order[test_size:]
    rng = np.random.default_rng(1)
    copies = [images[train]]
    for _ in range(train_copies - 1):
        dy, dx = rng.integers(-2, 3, size=2)
        copies.append(np.roll(images[train], (int(dy), int(dx)), axis=(1, 2)))
    train_images = np.concatenate(copies)
    train_labels = np.tile(y[train], train_copies)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, imgs, labels in (("train", train_images, train_labels),
                                 ("t10k", images[test], y[test])):
        labels = labels.astype(np.uint8)
        header = np.array([2051, len(labels), 28, 28], dtype=">i4").tobytes()
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(header + imgs.tobytes())
        header = np.array([2049, len(labels)], dtype=">i4").tobytes()
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(header + labels.tobytes())


def with_swaps(items: List[str]) -> Dict[str, Optional[str]]:
    """``VARIANTS`` plus one variant per ``NAME=KWARGS``: the example's optimizer line swapped
    for ``hvd_easgd.DistributedOptimizer(KWARGS, optimizer=...)``."""
    pairs = [item.split("=", 1) for item in items]
    return {**VARIANTS, **{name: "import hvd_easgd; optimizer = hvd_easgd.DistributedOptimizer("
                                 f"{kwargs}, optimizer=" for name, kwargs in pairs}}


def variant_script(example: Path, variant: str, work: Path,
                   variants: Optional[Dict[str, Optional[str]]] = None) -> Path:
    """The example itself, or with its one optimizer line swapped (``variants``: the swaps,
    ``VARIANTS`` by default)."""
    text = example.read_text()
    swap = (variants or VARIANTS)[variant]
    if swap is not None:
        line = next((ln for ln in text.splitlines() if HORovod_CALL in ln), None)
        if line is None:
            raise SystemExit(f"{example} has no '{HORovod_CALL}' line to swap")
        indent = line[: len(line) - len(line.lstrip())]
        text = text.replace(line, indent + swap + line.split(HORovod_CALL, 1)[1], 1)
    path = work / f"{variant}.py"
    path.write_text(text)
    return path


def victim_pids(script: Path) -> List[int]:
    """Worker processes of ``script`` started for host 127.0.0.1."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes()
        except OSError:
            continue
        if str(script).encode() in cmdline and b"HOROVOD_HOSTNAME=127.0.0.1\0" in environ:
            if cmdline.split(b"\0")[0].endswith(b"python") or b"python" in cmdline.split(b"\0")[0]:
                pids.append(int(proc.name))
    return pids


def run_once(script: Path, data: Path, work: Path, kill_epoch: Optional[int],
             timeout: float, epochs: Optional[int] = None) -> Dict[str, object]:
    hosts = work / "hosts.txt"
    hosts.write_text("localhost:1\n127.0.0.1:1\n")
    env = dict(os.environ, HOSTS_FILE=str(hosts), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    horovodrun = str(Path(sys.executable).with_name("horovodrun"))
    cmd = [horovodrun, "-np", "2", "--min-np", "1", "--max-np", "2",
           "--host-discovery-script", str(REPO / "launch" / "discover_hosts.sh"),
           "--network-interface", "lo", "--start-timeout", "120", "--elastic-timeout", "60",
           sys.executable, str(script), "--data-dir", str(data)]
    if epochs is not None:
        cmd += ["--epochs", str(epochs)]
    started = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=str(work))
    lines: List[str] = []
    killed: Dict[str, object] = {}

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if kill_epoch and not killed and f"Train Epoch: {kill_epoch} " in line:
                for pid in victim_pids(script):
                    os.kill(pid, signal.SIGKILL)
                    killed.update(pid=pid, after=round(time.time() - started, 1))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = "timeout"
    reader.join(5)
    found = [float(m.group(1)) for ln in lines for m in [ACCURACY.search(ln)] if m]
    return {"exit": code, "accuracy": found[-1] if found else None, "killed": killed or None,
            "seconds": round(time.time() - started, 1), "tail": "".join(lines[-15:])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--example", required=True, type=Path,
                    help="examples/elastic/pytorch/pytorch_mnist_elastic.py of a Horovod checkout")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--kill-epoch", type=int, default=3)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--swap", action="append", default=[], metavar="NAME=KWARGS",
                    help="a variant: hvd_easgd.DistributedOptimizer(KWARGS, optimizer=...)")
    ap.add_argument("--train-copies", type=int, default=1)
    ap.add_argument("--test-size", type=int, default=297)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    variants = with_swaps(args.swap)
    chosen = args.variants + [item.split("=", 1)[0] for item in args.swap]
    unknown = [v for v in chosen if v not in variants]
    if unknown:
        ap.error(f"unknown variant(s) {unknown}: use {sorted(VARIANTS)} or add one with --swap")
    work = Path(tempfile.mkdtemp(prefix="hvd_easgd_elastic_"))
    write_digits_as_mnist(work / "data", args.train_copies, args.test_size)
    E = args.kill_epoch
    runs = {"none": (None, None), f"at-kill (epoch {E - 1} done)": (None, E - 1),
            f"kill@epoch{E}": (E, None)}
    results: Dict[str, List[dict]] = {}
    for rep in range(args.reps):
        for variant in chosen:
            script = variant_script(args.example, variant, work, variants)
            for fault, (kill, epochs) in runs.items():
                if rep and kill is None:  # no fault: the same numbers every time
                    results[f"{variant} / {fault}"].append(results[f"{variant} / {fault}"][0])
                    continue
                res = run_once(script, work / "data", work, kill, args.timeout, epochs)
                results.setdefault(f"{variant} / {fault}", []).append(res)
                print(f"rep {rep + 1} {variant:12s} {fault:22s} exit={res['exit']} "
                      f"accuracy={res['accuracy']} ({res['seconds']} s)", flush=True)
    print("\n| run | fault | accuracy per repetition (%) | median | exits |")
    print("|---|---|---|---:|---|")
    for key, runs in results.items():
        variant, fault = key.split(" / ")
        accs = [r["accuracy"] for r in runs]
        ok = [a for a in accs if a is not None]
        med = f"{statistics.median(ok):.2f}" if ok else "-"
        print(f"| {variant} | {fault} | {', '.join('-' if a is None else f'{a:.2f}' for a in accs)} "
              f"| {med} | {', '.join(str(r['exit']) for r in runs)} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

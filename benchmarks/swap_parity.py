"""The one-line swap on Horovod's own MNIST examples, no faults: what it costs on a short run.

Runs ``examples/pytorch/pytorch_mnist.py`` (plain ``horovodrun -np 2``) and, with
``--elastic-example``, ``examples/elastic/pytorch/pytorch_mnist_elastic.py`` (elastic
``horovodrun``, as ``elastic_faults.py`` runs it) at their own defaults, unchanged
(``sync-sgd``) and with the optimizer line swapped (``elastic_faults.VARIANTS`` plus
``--swap NAME=KWARGS``). Data: scikit-learn's digits written as MNIST files (1500 training,
297 test images by default), so 10 epochs end far from convergence. Prints the final accuracy
each script reports and, for the plain example, its accuracy after every epoch.

    python benchmarks/swap_parity.py --example /tmp/horovod/examples/pytorch/pytorch_mnist.py \\
        --elastic-example /tmp/horovod/examples/elastic/pytorch/pytorch_mnist_elastic.py \\
        --swap 'sync-sgd-24=mode="sync", sync_sgd_steps=24' \\
        --swap 'average=mode="sync", method="average"'
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import List

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.elastic_faults import (ACCURACY, REPO, VARIANTS, run_once,  # noqa: E402
                                       variant_script, with_swaps, write_digits_as_mnist)


def run_plain(script: Path, data: Path, work: Path, np: int, timeout: float) -> List[float]:
    """The example under ``horovodrun -np NP --gloo``: its accuracy after every epoch."""
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    horovodrun = str(Path(sys.executable).with_name("horovodrun"))
    proc = subprocess.run(
        [horovodrun, "-np", str(np), "-H", f"localhost:{np}", "--gloo", sys.executable,
         str(script), "--data-dir", str(data)],
        capture_output=True, text=True, cwd=str(work), env=env, timeout=timeout)
    if proc.returncode:
        raise SystemExit(f"{script.name} exited {proc.returncode}:\n{proc.stdout[-3000:]}"
                         f"{proc.stderr[-3000:]}")
    return [float(m) for m in ACCURACY.findall(proc.stdout + proc.stderr)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--example", required=True, type=Path, help="examples/pytorch/pytorch_mnist.py")
    ap.add_argument("--elastic-example", type=Path,
                    help="examples/elastic/pytorch/pytorch_mnist_elastic.py (optional)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--swap", action="append", default=[], metavar="NAME=KWARGS")
    ap.add_argument("--test-size", type=int, default=297)
    ap.add_argument("--timeout", type=float, default=900)
    args = ap.parse_args(argv)
    variants = with_swaps(args.swap)
    work = Path(tempfile.mkdtemp(prefix="hvd_easgd_parity_"))
    write_digits_as_mnist(work / "data", 1, args.test_size)
    rows = []
    for variant in args.variants + [item.split("=", 1)[0] for item in args.swap]:
        curve = run_plain(variant_script(args.example, variant, work, variants), work / "data",
                          work, 2, args.timeout)
        elastic = "-"
        if args.elastic_example is not None:
            res = run_once(variant_script(args.elastic_example, variant, work, variants),
                           work / "data", work, None, args.timeout)
            elastic = f"{res['accuracy']:.2f}" if res["accuracy"] is not None else f"exit {res['exit']}"
        rows.append((variant, curve, elastic))
        print(f"{variant}: {curve[-1]:.2f} (elastic {elastic})", flush=True)
    print("\n| variant | pytorch_mnist.py | elastic example | pytorch_mnist.py after each epoch |")
    print("|---|---:|---:|---|")
    for variant, curve, elastic in rows:
        print(f"| {variant} | {curve[-1]:.2f} | {elastic} | {', '.join(f'{a:.1f}' for a in curve)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

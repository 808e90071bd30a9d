"""Horovod jobs shared by tests/train: the README's demo, run once for the tests that read it,
and a runner that notes when each output line arrives (to tell live output from a dump)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, Optional, Sequence

from tests.hvdrun import HOROVODRUN, REPO, START_TIMEOUT, worker_env

DEMO = "recipes/demo/digits.yaml"
#: As the launchers start a job: their default cycle (20 ms) marked as theirs, so a recipe's
#: horovod.cycle_time_ms replaces it.
LAUNCHER_ENV = {"HOROVOD_CYCLE_TIME": "20", "HVD_EASGD_DEFAULTED": "HOROVOD_CYCLE_TIME"}


def train_command() -> list:
    """The installed console script, else ``python -m hvd_easgd.train``."""
    script = Path(sys.executable).with_name("hvd-easgd-train")
    return [str(script)] if script.exists() else [sys.executable, "-m", "hvd_easgd.train"]


class Watched(subprocess.CompletedProcess):
    """A finished job's output, plus when each line arrived: ``arrivals`` holds
    ``(seconds since the start, line, the job still running then)`` in arrival order."""

    arrivals: list


def watch(command: Sequence[str], np: int = 2, timeout: float = 300,
          env: Optional[Dict[str, str]] = None) -> Watched:
    """``horovodrun -np NP -H localhost:NP --gloo COMMAND``, reading its stdout and stderr as they
    come (one reader thread each) and noting for every line when it arrived and whether the job
    was still running then. Fails with the output when the job fails."""
    cmd = [HOROVODRUN, "-np", str(np), "-H", f"localhost:{np}", "--gloo",
           "--start-timeout", str(START_TIMEOUT), *command]
    proc = subprocess.Popen(cmd, cwd=str(REPO), env=worker_env(env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, bufsize=1)
    start, arrivals = time.monotonic(), []
    texts: Dict[str, list] = {"stdout": [], "stderr": []}

    def read(stream, name):
        for line in stream:
            arrivals.append((time.monotonic() - start, line.rstrip("\n"), proc.poll() is None))
            texts[name].append(line)

    readers = [threading.Thread(target=read, args=(proc.stdout, "stdout"), daemon=True),
               threading.Thread(target=read, args=(proc.stderr, "stderr"), daemon=True)]
    for reader in readers:
        reader.start()
    try:
        code = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    for reader in readers:
        reader.join(timeout=30)
    done = Watched(cmd, code, "".join(texts["stdout"]), "".join(texts["stderr"]))
    done.arrivals = arrivals
    assert code == 0, (f"horovodrun exited {code}: {' '.join(cmd)}\n--- stdout (tail) ---\n"
                       f"{done.stdout[-6000:]}\n--- stderr (tail) ---\n{done.stderr[-6000:]}")
    return done


def run_demo(run_dir: Path) -> Watched:
    """The README's first command (`horovodrun -np 2 -H localhost:2 --gloo hvd-easgd-train
    --config recipes/demo/digits.yaml`) as the launchers start it, with a progress line every
    half second so that the console tests see several."""
    return watch([*train_command(), "--config", DEMO, "--run-dir", str(run_dir),
                  "--log-every", "0.5"], np=2, timeout=280, env=LAUNCHER_ENV)

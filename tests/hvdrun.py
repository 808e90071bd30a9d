"""Run a script under a real `horovodrun --gloo` job from a test, and collect per-rank results.

Worker scripts live in `tests/workers/`. By convention a worker takes `--out DIR` and writes
`DIR/rank{R}.json`; `run_workers` returns those dicts ordered by rank.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

REPO = Path(__file__).resolve().parents[1]
WORKERS = Path(__file__).resolve().parent / "workers"
HOROVODRUN = str(Path(sys.executable).with_name("horovodrun"))

# Rendezvous on a loaded 2-core CI box can exceed Horovod's 30 s defaults.
START_TIMEOUT = int(os.environ.get("HVD_EASGD_TEST_START_TIMEOUT", "120"))


def worker_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.setdefault("HOROVOD_GLOO_TIMEOUT_SECONDS", "120")
    env.pop("HOROVOD_RANK", None)
    if extra:
        env.update(extra)
    return env


def horovodrun(
    command: Sequence[str],
    np: int = 2,
    timeout: float = 300,
    env: Optional[Dict[str, str]] = None,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """Run `horovodrun -np NP -H localhost:NP --gloo COMMAND...`; on failure, fail with its output."""
    cmd = [
        HOROVODRUN, "-np", str(np), "-H", f"localhost:{np}", "--gloo",
        "--start-timeout", str(START_TIMEOUT), *command,
    ]
    proc = subprocess.run(
        cmd, cwd=str(REPO), env=worker_env(env), capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"horovodrun exited {proc.returncode}: {' '.join(cmd)}\n"
            f"--- stdout (tail) ---\n{proc.stdout[-6000:]}\n--- stderr (tail) ---\n{proc.stderr[-6000:]}"
        )
    return proc


def run_workers(
    script: str,
    out_dir: Path,
    np: int = 2,
    args: Sequence[str] = (),
    timeout: float = 300,
    env: Optional[Dict[str, str]] = None,
) -> List[dict]:
    """Run `tests/workers/SCRIPT --out OUT_DIR ARGS...` on NP Gloo workers; return rank dicts."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    horovodrun([sys.executable, str(WORKERS / script), "--out", str(out_dir), *args],
               np=np, timeout=timeout, env=env)
    return read_rank_results(out_dir, np)


class SharedJob:
    """One `run_workers` job that several test modules share, to pay Horovod's start-up once.

    Each module adds its items when it is imported (pytest imports every selected module before
    it runs a test); the first test that needs a result runs the job with all of them, the
    others read it. Items are named by ``item["case"]["name"]``, unique across the modules. A
    job that fails or hangs fails every test that needs it, with its output, and runs once.
    """

    def __init__(self, script: str, np: int, timeout: float = 240,
                 env: Optional[Dict[str, str]] = None) -> None:
        self.script, self.np, self.timeout, self.env = script, np, timeout, env
        self.out_dir: Optional[Path] = None
        self._items: List[dict] = []
        self._last: List[dict] = []
        self._outcome: Union[None, Dict[str, List[dict]], BaseException] = None

    def add(self, items: Sequence[dict], last: bool = False) -> None:
        """Add items (before the job runs); ``last=True`` items run after all the others."""
        assert self._outcome is None, "the job has already run"
        names = {i["case"]["name"] for i in self._items + self._last}
        clash = names & {i["case"]["name"] for i in items}
        assert not clash, f"item names used twice in {self.script}: {sorted(clash)}"
        (self._last if last else self._items).extend(items)

    def results(self, tmp_path_factory) -> Dict[str, List[dict]]:
        """{item name: [rank 0's result, rank 1's, ...]}, running the job the first time."""
        if self._outcome is None:
            self.out_dir = tmp_path_factory.mktemp(f"{Path(self.script).stem}_np{self.np}")
            items = self._items + self._last
            try:
                ranks = run_workers(self.script, self.out_dir, np=self.np, timeout=self.timeout,
                                    args=["--cases", json.dumps(items)], env=self.env)
                self._outcome = {item["case"]["name"]: [r["results"][i] for r in ranks]
                                 for i, item in enumerate(items)}
            except (AssertionError, subprocess.TimeoutExpired) as exc:
                self._outcome = exc
        if isinstance(self._outcome, BaseException):
            raise AssertionError(f"the {self.np}-worker {self.script} job failed: {self._outcome}")
        return self._outcome


#: The optimizer's 2- and 3-worker jobs (tests/workers/opt_async.py runs every item kind of
#: tests/optim/test_async.py and test_outer.py). HOROVOD_CYCLE_TIME as the launchers set it
#: (test_async.py::test_waiting_for_a_round_does_not_spin).
OPT_JOBS = {np: SharedJob("opt_async.py", np, env={"HOROVOD_GLOO_TIMEOUT_SECONDS": "60",
                                                   "HOROVOD_CYCLE_TIME": "5"})
            for np in (2, 3)}


def read_rank_results(out_dir: Path, np: int) -> List[dict]:
    results = []
    for rank in range(np):
        path = Path(out_dir) / f"rank{rank}.json"
        assert path.exists(), f"worker rank {rank} wrote no {path.name}"
        results.append(json.loads(path.read_text()))
    return results


def write_rank_result(out_dir: str, rank: int, result: dict) -> None:
    """For worker scripts: write this rank's result atomically."""
    write_json_atomic(Path(out_dir) / f"rank{rank}.json", result)


def write_json_atomic(path: Path, result: dict) -> None:
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, path)


def horovodrun_elastic(
    command: Sequence[str],
    hosts: Sequence[str],
    hosts_file: Path,
    np: int,
    min_np: int,
    max_np: int,
    timeout: float = 300,
    env: Optional[Dict[str, str]] = None,
) -> subprocess.CompletedProcess:
    """Run an elastic `horovodrun` whose discovery script (launch/discover_hosts.sh) reads
    `hosts_file`, which starts with `hosts` (e.g. ["localhost:1", "127.0.0.1:1"]: Horovod
    treats the two names as two hosts). Returns the finished process (no check)."""
    Path(hosts_file).write_text("".join(f"{h}\n" for h in hosts))
    cmd = [
        HOROVODRUN, "-np", str(np), "--min-np", str(min_np), "--max-np", str(max_np),
        "--host-discovery-script", str(REPO / "launch" / "discover_hosts.sh"),
        "--start-timeout", str(START_TIMEOUT), "--elastic-timeout", "60",
        "--network-interface", "lo", *command,
    ]
    extra = {"HOSTS_FILE": str(hosts_file), **(env or {})}
    return subprocess.run(cmd, cwd=str(REPO), env=worker_env(extra), capture_output=True,
                          text=True, timeout=timeout)

"""Chaos: SIGKILL workers of a real elastic Horovod job and bring them back, on a schedule (issue 25).

One command runs every variant twice, as an elastic ``horovodrun -np 2 --min-np 1 --max-np 2``:
once with the fault schedule and once without (the reference), and prints one markdown table
per variant. The variants:

- ``example/sync-sgd``: Horovod's ``examples/elastic/pytorch/pytorch_mnist_elastic.py``
  unchanged (``--example``; nothing of it is stored here);
- ``example/easgd-sync``, ``example/easgd-async``: the same script with its
  ``hvd.DistributedOptimizer(`` call swapped for ``hvd_easgd.DistributedOptimizer(mode=...,``
  (``benchmarks/elastic_faults.py``'s swap);
- ``trainer/easgd-sync``, ``trainer/easgd-async``, ``trainer/sync-sgd``: this project's
  ``hvd-easgd-train --config recipes/demo/digits_elastic.yaml --set elastic.enabled=true``
  with ``optimizer.method`` / ``optimizer.mode`` set (sync SGD: ``sync_sgd`` with momentum 0,
  i.e. Horovod's ``DistributedOptimizer`` around the plain SGD at the recipe's lr 0.1 that
  EASGD steps locally).

The example trains on scikit-learn's digits written as MNIST files
(``elastic_faults.write_digits_as_mnist``: 1500 training images, 297 test images, no extra
copies); the trainer on its own digits split (``data.name: digits``).

**Hosts and faults.** The discovery script (``launch/discover_hosts.sh``) reads a hosts file
that starts as ``localhost:1`` and ``127.0.0.1:1``: two hosts to Horovod, both local (Horovod
runs a host's workers without ssh when the name resolves to an address of a local interface;
``127.0.0.2`` does not, so it would ssh). The schedule, e.g.
``--schedule kill@epoch2,join@epoch3,kill@epoch5,join@epoch6``, is a list of events run in
order, each driven by the job's output lines, never by sleeps:

- ``kill@epochE``: at the first training line reporting epoch >= E (the epoch as the script
  prints it: the example counts from 1 and prints whole epochs plus its ``(NN%)``, the trainer
  counts from 0), every worker process of the victim host gets SIGKILL and the host leaves the
  hosts file, as a dead machine leaves a cluster's discovery. The victim host is the one whose
  worker started as rank 1 (Horovod orders the first hosts as a Python set does, so either);
  it is the victim for the whole run. Horovod keeps the surviving host first, so the survivor
  stays rank 0 with output prefix ``[0]`` and a returning worker is rank 1, prefix ``[1]``.
  Worker processes are found in /proc: descendants of this job whose environment has
  ``HOROVOD_HOSTNAME`` (and, the first time, ``HOROVOD_RANK=1``).
- ``join@epochE``: the host goes back into the hosts file. Horovod blacklists a host whose
  worker failed, for good unless ``horovodrun --blacklist-cooldown-range MIN MAX`` is given
  (``--cooldown``, default 1 1: the shortest, 1 s): after the cooldown the listed host is
  whitelisted and a new worker starts there.
- An event is armed only when the previous one is complete: a kill when training steps resumed
  after it, a join when the job trains with 2 workers again; and it fires no earlier than
  ``--min-gap`` epochs (default 1) after that, so every phase trains at least that long. An
  event whose epoch has passed by then fires at the next training line; the table says where
  each one fell and, for a join, the epoch at which 2 workers trained again (a lone survivor
  keeps training while Horovod brings the host back and the new process starts). One that
  does not complete within ``--event-timeout`` seconds ends the run (reported as hung).

**What is measured, from the outside** (the job's merged stdout/stderr, every line timestamped
by this process when it reads it; the full log is kept, ``--work``):

- *steps resumed* after a kill: the example restarts its batch loop at 0 after a reset, so the
  first line of a surviving stream whose (epoch, sample) position is not past its last one
  before the kill; the trainer prints ``elastic reset: N worker(s)`` on rank 0, so the first
  progress line after that. *2 workers again* after a join: the example prints on every rank,
  so the first moment lines from 2 streams (``[0]``, ``[1]``) came after the join; the trainer:
  the first progress line after ``elastic reset: 2 worker(s)``.
- *throughput*: samples processed per second between the first and the last training line.
  The example (``--log-interval 1``, forced) prints one line per batch per worker: one line is
  one batch of ``--batch-size`` samples (the smaller last batch of an epoch counts as full).
  The trainer prints its per-worker step every ``log.every`` steps (console every 0 s): a
  progress line adds (step - previous step) x batch x workers, workers from its reset lines;
  after a reset counting restarts from the step it rolled back to. Steps redone after a
  rollback count again: this is work done, not progress. *Retained* = with faults / without.
- *accuracy*: the example's final ``Accuracy: X%``; the trainer's final center test error
  (accuracy = 100 - error), and its evaluations (``train.eval_every``) as "accuracy then".

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/chaos.py \\
        --example /tmp/horovod/examples/elastic/pytorch/pytorch_mnist_elastic.py \\
        --schedule kill@epoch2,join@epoch3,kill@epoch5,join@epoch6 --json runs/bench/chaos.json

Exits 0 when every run with faults exited 0 and every scheduled event completed, else 1.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.elastic_faults import variant_script, write_digits_as_mnist  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
HOSTS = ("localhost", "127.0.0.1")  # two "hosts" to Horovod, both this machine
DEFAULT_SCHEDULE = "kill@epoch2,join@epoch3,kill@epoch5,join@epoch6"
EXAMPLE_ARGS = "--epochs 16"
TRAINER_RECIPE = "recipes/demo/digits_elastic.yaml"
TRAINER_SETS = ["elastic.enabled=true", "log.console_seconds=0", "log.every=5",
                "log.tensorboard=false", "train.eval_every=22", "checkpoint.every=0"]
VARIANTS: Dict[str, Tuple[str, object]] = {
    "example/sync-sgd": ("example", "sync-sgd"),
    "example/easgd-sync": ("example", "easgd-sync"),
    "example/easgd-async": ("example", "easgd-async"),
    "trainer/easgd-sync": ("trainer", ["optimizer.method=easgd", "optimizer.mode=sync"]),
    "trainer/easgd-async": ("trainer", ["optimizer.method=easgd", "optimizer.mode=async"]),
    "trainer/sync-sgd": ("trainer", ["optimizer.method=sync_sgd", "optimizer.momentum=0"]),
}
PREFIX = re.compile(r"^\[(\d+)\]<(?:stdout|stderr)>:(.*)$")


# ---------------------------------------------------------------------- the schedule


@dataclass(frozen=True)
class Fault:
    """One scheduled event and what happened to it (times: seconds since the job started).
    A run's :class:`Chaos` records what happened by replacing its faults."""

    action: str  # kill | join
    at_epoch: float
    fired: Optional[float] = None  # when this process killed / re-listed the host
    epoch: Optional[float] = None  # the epoch of the training line that fired it
    loss: Optional[float] = None  # the loss on that line
    accuracy: Optional[float] = None  # the last accuracy the job reported before it (%)
    host: Optional[str] = None  # kill: the victim host
    pids: List[int] = field(default_factory=list)  # kill: the processes that got SIGKILL
    pids_gone: Optional[bool] = None  # kill: every one of them dead (gone or a zombie) after it
    done: Optional[float] = None  # kill: training steps resumed; join: 2 workers training again
    done_epoch: Optional[float] = None  # the epoch of the training line that showed it
    recover_s: Optional[float] = None  # done - fired

    @property
    def label(self) -> str:
        return f"{self.action}@epoch{self.at_epoch:g}"


def parse_schedule(text: str) -> List[Fault]:
    """``kill@epoch2,join@epoch3,...`` -> faults; kills and joins must alternate from a kill."""
    faults = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        m = re.fullmatch(r"(kill|join)@epoch([0-9]+(?:\.[0-9]+)?)", item)
        if not m:
            raise SystemExit(f"--schedule: '{item}' is not kill@epochE or join@epochE")
        faults.append(Fault(m.group(1), float(m.group(2))))
    for i, f in enumerate(faults):
        if f.action != ("kill" if i % 2 == 0 else "join"):
            raise SystemExit(f"--schedule: events must alternate kill, join, kill, ...; got {text}")
        if i and f.at_epoch < faults[i - 1].at_epoch:
            raise SystemExit(f"--schedule: epochs must not decrease; got {text}")
    return faults


# ---------------------------------------------------------------------- reading the job's output


@dataclass
class Step:
    t: float
    stream: str
    epoch: float
    loss: Optional[float]


class Output:
    """What a job's output lines said, as they arrive: training steps (with their epoch and
    loss), resets, evaluations and the final accuracy, and the samples processed. Subclasses
    parse one script's lines (:meth:`parse`); the queries answer "since time t0"."""

    def __init__(self, batch_size: int) -> None:
        self.batch = batch_size
        self.steps: List[Step] = []
        self.resets: List[Tuple[float, Optional[int]]] = []  # (time, workers if printed)
        self.accuracies: List[Tuple[float, float]] = []  # (time, %)
        self.final_accuracy: Optional[float] = None
        self.samples = 0  # processed after the first training line

    def feed(self, t: float, line: str) -> Optional[Step]:
        m = PREFIX.match(line)
        stream, text = (m.group(1), m.group(2)) if m else ("driver", line)
        return self.parse(t, stream, text)

    def parse(self, t: float, stream: str, text: str) -> Optional[Step]:
        raise NotImplementedError

    def last_accuracy(self) -> Optional[float]:
        return self.accuracies[-1][1] if self.accuracies else None

    def resumed_after(self, t0: float) -> Optional[Step]:
        """The first training line after the first reset after ``t0`` (the line at ``t0`` is
        the one that fired the kill: not after it)."""
        reset = next((t for t, _ in self.resets if t > t0), None)
        return None if reset is None else next((s for s in self.steps if s.t >= reset), None)

    def two_workers_after(self, t0: float) -> Optional[Step]:
        """The first training line by which 2 workers train, after ``t0``."""
        raise NotImplementedError

    def throughput(self) -> Optional[float]:
        if len(self.steps) < 2 or self.steps[-1].t <= self.steps[0].t:
            return None
        return self.samples / (self.steps[-1].t - self.steps[0].t)


class ExampleOutput(Output):
    """Horovod's elastic MNIST example: ``Train Epoch: E [x/N (p%)]\\tLoss: L`` from every rank
    every batch (``--log-interval 1``), ``Accuracy: X%`` from rank 0 at the end."""

    LINE = re.compile(r"Train Epoch: (\d+) \[(\d+)/(\d+) \((\d+)%\)\]\s+Loss: (\S+)")
    FINAL = re.compile(r"Accuracy: ([0-9.]+)%")

    def __init__(self, batch_size: int) -> None:
        super().__init__(batch_size)
        self.position: Dict[str, Tuple[int, int]] = {}

    def parse(self, t: float, stream: str, text: str) -> Optional[Step]:
        final = self.FINAL.search(text)
        if final:
            self.final_accuracy = float(final.group(1))
        m = self.LINE.search(text)
        if not m:
            return None
        pos = (int(m.group(1)), int(m.group(2)))
        if stream in self.position and pos <= self.position[stream]:
            self.resets.append((t, None))  # the batch loop restarted: a reset (or a new worker)
        self.position[stream] = pos
        if self.steps:
            self.samples += self.batch
        step = Step(t, stream, int(m.group(1)) + int(m.group(4)) / 100.0, _number(m.group(5)))
        self.steps.append(step)
        return step

    def two_workers_after(self, t0: float) -> Optional[Step]:
        seen = set()
        for s in self.steps:
            if s.t > t0:
                seen.add(s.stream)
                if len(seen) >= 2:
                    return s
        return None


class TrainerOutput(Output):
    """``hvd-easgd-train`` (rank 0 prints): progress lines ``step N/M (p%) epoch E | loss L``,
    ``elastic reset: W worker(s), continuing from step S``, evaluations ``center test error``
    and the summary's ``center test error X% final``."""

    PROGRESS = re.compile(r"\] step (\d+)/\d+ \(\d+%\) epoch ([0-9.]+) \| loss (\S+)")
    RESET = re.compile(r"elastic reset: (\d+) worker\(s\), continuing from step (\d+)")
    EVAL = re.compile(r"\] step \d+/\d+: center test error ([0-9.]+)%")
    FINAL = re.compile(r"center test error ([0-9.]+)% final")

    def __init__(self, batch_size: int, workers: int = 2) -> None:
        super().__init__(batch_size)
        self.workers, self.step = workers, None

    def parse(self, t: float, stream: str, text: str) -> Optional[Step]:
        for pattern, target in ((self.EVAL, self.accuracies), (self.FINAL, None)):
            m = pattern.search(text)
            if m and target is not None:
                target.append((t, 100.0 - float(m.group(1))))
            elif m:
                self.final_accuracy = 100.0 - float(m.group(1))
        m = self.RESET.search(text)
        if m:
            self.workers, self.step = int(m.group(1)), int(m.group(2))
            self.resets.append((t, self.workers))
        m = self.PROGRESS.search(text)
        if not m:
            return None
        step = int(m.group(1))
        if self.steps and self.step is not None:
            self.samples += max(0, step - self.step) * self.batch * self.workers
        self.step = step
        s = Step(t, stream, float(m.group(2)), _number(m.group(3)))
        self.steps.append(s)
        return s

    def two_workers_after(self, t0: float) -> Optional[Step]:
        reset = next((t for t, w in self.resets if t > t0 and (w or 0) >= 2), None)
        return None if reset is None else next((s for s in self.steps if s.t >= reset), None)


def _number(text: str) -> Optional[float]:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


# ---------------------------------------------------------------------- acting on the job


def write_hosts(path: Path, hosts: Sequence[str]) -> None:
    """The discovery script's file, replaced atomically (Horovod reads it every second)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(f"{h}:1\n" for h in hosts))
    os.replace(tmp, path)


def descendants(root: int) -> List[int]:
    """Every live process below ``root`` (from /proc's parent links)."""
    parent = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                stat = (proc / "stat").read_text()
            except OSError:
                continue
            parent[int(proc.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [root]
    while frontier:
        kids = [p for p, pp in parent.items() if pp in frontier]
        found += kids
        frontier = kids
    return found


def workers(job: int) -> List[Tuple[int, Dict[str, str]]]:
    """This job's Python worker processes, each with the ``HOROVOD_*`` variables Horovod
    started it with (its host and its rank at that time)."""
    found = []
    for pid in descendants(job):
        try:
            exe = os.readlink(f"/proc/{pid}/exe")
            environ = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
        except OSError:
            continue
        env = dict(kv.split("=", 1) for kv in environ.split("\0") if kv.startswith("HOROVOD_"))
        if "python" in Path(exe).name and "HOROVOD_HOSTNAME" in env:
            found.append((pid, env))
    return found


def is_dead(pid: int) -> bool:
    """Gone, or a zombie waiting for its parent to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


class Chaos:
    """Runs the schedule against one job, from its output lines (:meth:`on_line`, called by
    the reader thread) and the clock (:meth:`overdue`, called by the watcher)."""

    def __init__(self, faults: List[Fault], out: Output, hosts_file: Path, job: int,
                 event_timeout: float, min_gap: float) -> None:
        self.faults, self.out, self.hosts_file, self.job = list(faults), out, hosts_file, job
        self.event_timeout, self.min_gap = event_timeout, min_gap
        self.next = 0  # index of the event in progress (fired, not done) or next to fire
        self.victim: Optional[str] = None  # the host killed every time: rank 1's at the first kill
        self.lock = threading.Lock()

    def on_line(self, t: float, step: Optional[Step]) -> None:
        with self.lock:
            if self.next >= len(self.faults):
                return
            f = self.faults[self.next]
            if f.fired is not None:
                done = (self.out.resumed_after if f.action == "kill" else
                        self.out.two_workers_after)(f.fired)
                if done is None:
                    return
                self.faults[self.next] = replace(f, done=done.t, done_epoch=done.epoch,
                                                 recover_s=round(done.t - f.fired, 2))
                self.next += 1
                if self.next >= len(self.faults):
                    return
                f = self.faults[self.next]
            previous = self.faults[self.next - 1].done_epoch if self.next else None
            earliest = f.at_epoch if previous is None else max(f.at_epoch, previous + self.min_gap)
            if step is not None and step.epoch >= earliest:
                self.fire(f, t, step)

    def fire(self, f: Fault, t: float, step: Step) -> None:
        """Carry out ``f`` (the event at ``self.next``) now, and record it."""
        f = replace(f, fired=t, epoch=step.epoch, loss=step.loss,
                    accuracy=self.out.last_accuracy())
        if f.action == "join":
            write_hosts(self.hosts_file, HOSTS)
        else:
            f = self.kill(f)
        self.faults[self.next] = f

    def kill(self, f: Fault) -> Fault:
        """SIGKILL every worker of the victim host (rank 1's at the first kill), unlist it."""
        procs = workers(self.job)
        if self.victim is None:
            self.victim = next((env["HOROVOD_HOSTNAME"] for _, env in procs
                                if env.get("HOROVOD_RANK") == "1"), None)
        pids = [pid for pid, env in procs if env["HOROVOD_HOSTNAME"] == self.victim]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        write_hosts(self.hosts_file, [h for h in HOSTS if h != self.victim])
        deadline = time.monotonic() + 5
        while not all(map(is_dead, pids)) and time.monotonic() < deadline:
            time.sleep(0.01)
        return replace(f, host=self.victim, pids=pids,
                       pids_gone=bool(pids) and all(map(is_dead, pids)))

    def overdue(self, now: float) -> Optional[str]:
        """Why the run should stop now (an event not done within the timeout), or None."""
        with self.lock:
            if self.next < len(self.faults):
                f = self.faults[self.next]
                if f.action == "kill" and f.fired is not None and not f.pids:
                    return f"{f.label}: found no worker of a host started as rank 1 to kill"
                if f.fired is not None and now - f.fired > self.event_timeout:
                    what = "training steps resumed" if f.action == "kill" else "2 workers training"
                    return (f"{f.label}: no sign of {what} {self.event_timeout:g} s after it "
                            f"(fired at epoch {f.epoch:.2f})")
        return None


# ---------------------------------------------------------------------- one run


def horovodrun_command(cooldown: Sequence[int]) -> List[str]:
    """The elastic launch: 2 workers at most, 1 at least, hosts from the discovery script."""
    return [str(Path(sys.executable).with_name("horovodrun")), "-np", "2", "--min-np", "1",
            "--max-np", "2", "--host-discovery-script", str(REPO / "launch" / "discover_hosts.sh"),
            "--network-interface", "lo", "--start-timeout", "120", "--elastic-timeout", "120",
            "--blacklist-cooldown-range", str(cooldown[0]), str(cooldown[1])]


def job_env(hosts_file: Path) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOROVOD_")}
    env.update(HOSTS_FILE=str(hosts_file), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               HOROVOD_GLOO_TIMEOUT_SECONDS="120",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return env


def run_job(command: List[str], out: Output, faults: List[Fault], work: Path, name: str,
            opts: argparse.Namespace) -> dict:
    """Run one elastic job through the schedule ``faults`` (empty: no faults); return what
    happened (:func:`summarize`). ``opts``: ``cooldown``, ``timeout`` (seconds for the run),
    ``event_timeout``, ``min_gap`` (see :class:`Chaos`). Every output line goes to
    ``work/NAME.log`` as ``seconds<TAB>line``; the job runs in its own session, killed whole
    when it overruns."""
    hosts_file, log_path = work / f"{name}.hosts", work / f"{name}.log"
    write_hosts(hosts_file, HOSTS)
    proc = subprocess.Popen(horovodrun_command(opts.cooldown) + command, cwd=str(work),
                            env=job_env(hosts_file), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    started = time.monotonic()
    chaos = Chaos(faults, out, hosts_file, proc.pid, opts.event_timeout, opts.min_gap)

    def read() -> None:
        with open(log_path, "w") as log:
            for line in proc.stdout:
                t = time.monotonic() - started
                line = line.rstrip("\n")
                log.write(f"{t:.3f}\t{line}\n")
                log.flush()
                chaos.on_line(t, out.feed(t, line))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    code, problem = None, None
    while code is None:
        try:
            code = proc.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            now = time.monotonic() - started
            problem = chaos.overdue(now) or (
                f"no exit after {opts.timeout:g} s" if now > opts.timeout else None)
            if problem:
                stop_job(proc)
                code = "hung"
    reader.join(10)
    return summarize(out, chaos.faults, code, problem, time.monotonic() - started, log_path)


def stop_job(proc: subprocess.Popen) -> None:
    """SIGKILL the job: horovodrun's process group and every process below it (Horovod starts
    each worker in a session of its own, out of reach of the group)."""
    below = descendants(proc.pid)
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in below:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def summarize(out: Output, faults: List[Fault], code, problem: Optional[str], seconds: float,
              log_path: Path) -> dict:
    """One run as a JSON-able dict."""
    kills = [f for f in faults if f.action == "kill"]
    joins = [f for f in faults if f.action == "join"]
    if problem is None and any(f.done is None for f in faults):
        problem = "the job ended before " + ", ".join(f.label for f in faults if f.done is None)
    rate = out.throughput()
    return {
        "exit": code, "problem": problem, "seconds": round(seconds, 1),
        "final_accuracy": out.final_accuracy,
        "kills_survived": sum(f.done is not None for f in kills),
        "kills": len(kills), "rejoins": sum(f.done is not None for f in joins), "joins": len(joins),
        "samples": out.samples, "samples_per_s": None if rate is None else round(rate, 1),
        "training_s": round(out.steps[-1].t - out.steps[0].t, 2) if out.steps else None,
        "faults": [dict(asdict(f), label=f.label) for f in faults],
        "log": str(log_path),
    }


# ---------------------------------------------------------------------- variants


def variant_job(variant: str, args: argparse.Namespace, work: Path, data: Path,
                run: str) -> Tuple[List[str], Output]:
    """The worker command of ``variant`` and the parser for its output."""
    kind, spec = VARIANTS[variant]
    if kind == "example":
        script = variant_script(args.example, str(spec), work)
        extra = shlex.split(args.example_args)
        batch = int(extra[extra.index("--batch-size") + 1]) if "--batch-size" in extra else 64
        return ([sys.executable, str(script), "--data-dir", str(data), *extra,
                 "--log-interval", "1"], ExampleOutput(batch))
    train = Path(sys.executable).with_name("hvd-easgd-train")
    launcher = [str(train)] if train.exists() else [sys.executable, "-m", "hvd_easgd.train"]
    sets = TRAINER_SETS + list(spec) + list(args.trainer_set)
    cmd = launcher + ["--config", str(REPO / TRAINER_RECIPE), "--run-dir",
                      str(work / f"run-{run}")]
    for s in sets:
        cmd += ["--set", s]
    batch = next((int(s.split("=", 1)[1]) for s in reversed(sets)
                  if s.startswith("train.batch_size=")), 32)
    return cmd, TrainerOutput(batch)


def run_variant(variant: str, args: argparse.Namespace, work: Path, data: Path) -> dict:
    """The variant with the schedule and (unless --no-clean) without it."""
    result = {}
    for label, schedule in (("faults", args.schedule), ("clean", "")):
        if label == "clean" and args.no_clean:
            continue
        name = f"{variant.replace('/', '-')}-{label}"
        cmd, out = variant_job(variant, args, work, data, name)
        result[label] = run_job(cmd, out, parse_schedule(schedule), work, name, args)
        r = result[label]
        print(f"# {variant} {label}: exit {r['exit']}, accuracy {r['final_accuracy']}, "
              f"{r['seconds']} s{'' if not r['problem'] else ' - ' + r['problem']}", flush=True)
    return result


# ---------------------------------------------------------------------- the report


def _fmt(value, spec: str = "", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def variant_table(variant: str, result: dict, schedule: str) -> List[str]:
    """Markdown: a summary row, then one row per fault."""
    run, clean = result["faults"], result.get("clean") or {}
    ratio = None
    if run.get("samples_per_s") and clean.get("samples_per_s"):
        ratio = run["samples_per_s"] / clean["samples_per_s"]
    lines = [f"### {variant} ({schedule})", "",
             "| kills survived | rejoins | exit | final accuracy | without faults | "
             "throughput retained | samples/s (faults / none) |",
             "|---|---|---|---:|---:|---:|---|",
             f"| {run['kills_survived']}/{run['kills']} | {run['rejoins']}/{run['joins']} "
             f"| {run['exit']} | {_fmt(run['final_accuracy'], '.2f', '%')} "
             f"| {_fmt(clean.get('final_accuracy'), '.2f', '%')} | {_fmt(ratio, '.2f')} "
             f"| {_fmt(run['samples_per_s'], ',.0f')} / {_fmt(clean.get('samples_per_s'), ',.0f')} |",
             "", "| fault | fell at epoch | loss then | accuracy then | SIGKILLed pids | "
             "recovered in | until |", "|---|---:|---:|---:|---|---:|---|"]
    for f in run["faults"]:
        pids = "-" if f["action"] != "kill" or f["fired"] is None else (
            f"{f['host']}: " + " ".join(map(str, f["pids"]))
            + (" (dead)" if f["pids_gone"] else " (NOT dead)") if f["pids"] else "none found")
        until = "steps resumed" if f["action"] == "kill" else "2 workers training"
        until += "" if f["done_epoch"] is None else f" (epoch {f['done_epoch']:.2f})"
        lines.append(f"| {f['label']} | {_fmt(f['epoch'], '.2f')} | {_fmt(f['loss'], '.4g')} "
                     f"| {_fmt(f['accuracy'], '.2f', '%')} | {pids} "
                     f"| {_fmt(f['recover_s'], '.1f', ' s')} | {until} |")
    if run["problem"]:
        lines += ["", f"Problem: {run['problem']} (log: {run['log']})"]
    return lines + [""]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--example", type=Path,
                    help="examples/elastic/pytorch/pytorch_mnist_elastic.py of a Horovod checkout")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--schedule", default=DEFAULT_SCHEDULE,
                    help=f"kill@epochE,join@epochE,... in order [{DEFAULT_SCHEDULE}]")
    ap.add_argument("--example-args", default=EXAMPLE_ARGS,
                    help=f"arguments for the example script [{EXAMPLE_ARGS!r}]")
    ap.add_argument("--trainer-set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra --set for the trainer variants (repeatable)")
    ap.add_argument("--cooldown", type=int, nargs=2, default=[1, 1], metavar=("MIN", "MAX"),
                    help="horovodrun --blacklist-cooldown-range [1 1]")
    ap.add_argument("--min-gap", type=float, default=1.0,
                    help="epochs an event waits at least after the previous one completed [1]")
    ap.add_argument("--no-clean", action="store_true", help="skip the runs without faults")
    ap.add_argument("--event-timeout", type=float, default=180,
                    help="seconds an event may take to complete before the run is stopped [180]")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per run [900]")
    ap.add_argument("--work", type=Path, help="where data, scripts and logs go [a temp dir]")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    parse_schedule(args.schedule)  # fail early on a bad schedule
    if any(v.startswith("example/") for v in args.variants) and not args.example:
        ap.error("the example/* variants need --example PATH")
    work = args.work or Path(tempfile.mkdtemp(prefix="hvd_easgd_chaos_"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data"
    if any(v.startswith("example/") for v in args.variants):
        write_digits_as_mnist(data, train_copies=1, test_size=297)
    print(f"# work dir {work}", flush=True)
    started = time.monotonic()
    results = {v: run_variant(v, args, work, data) for v in args.variants}
    print()
    for variant, result in results.items():
        print("\n".join(variant_table(variant, result, args.schedule)))
    print(f"({(time.monotonic() - started) / 60:.1f} minutes)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"schedule": args.schedule, "results": results,
                                         "argv": sys.argv[1:]}, indent=1))
    return 0 if all(r["faults"]["problem"] is None and r["faults"]["exit"] == 0
                    for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

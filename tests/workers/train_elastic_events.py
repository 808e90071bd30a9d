"""Worker: `hvd_easgd.train.run` as an elastic job whose hosts change on schedule.

Started by launch/run_elastic.sh (TRAIN="python tests/workers/train_elastic_events.py"), so it
takes hvd-easgd-train's `--config`, `--set`, `--run-dir` and `--resume`, plus:

- `--hosts-at N=HOST:SLOTS,...` (repeatable): after step N rank 0 writes those lines to
  $HOSTS_FILE, adding or removing hosts, and waits until Horovod tells it about the change
  (once per job: RUN_DIR/hosts-at-N holds the time it wrote them);
- `--kill-host HOST --kill-at N`: after step N the worker on HOST kills itself with SIGKILL
  (once per job: RUN_DIR/killed);
- `--hold-at N`: after step N every worker stops and waits to be killed; rank 0 first writes
  RUN_DIR/held (the test then kills the launcher: a job killed from outside).

While this world has fewer workers than $HOSTS_FILE lists, rank 0 waits after a step until
Horovod tells it that a host was added (at most 120 s; once per world: its next commit then
takes the joiner in), so the job cannot finish before the expected worker joins: the order of
events is explicit, not a matter of timing.

Each process appends a line to RUN_DIR/syncs-<host>-<pid>.jsonl after every elastic sync
(time, rank, size, step, distance of its parameters to the center) and, if it finishes, writes
RUN_DIR/result-<host>-<pid>.json (the summary, rank, size, host).
"""

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from hvd_easgd.train.config import load_config  # noqa: E402
from tests.hvdrun import write_json_atomic  # noqa: E402

HOST = os.environ.get("HOROVOD_HOSTNAME", "unknown")
ME = f"{HOST}-{os.getpid()}"
SYNCS = [0]  # elastic syncs this process took part in


def listed_slots() -> int:
    lines = Path(os.environ["HOSTS_FILE"]).read_text().split()
    return sum(int(line.partition(":")[2] or 1) for line in lines if not line.startswith("#"))


class HostNotices:
    """Listens to Horovod's host notifications (sent to rank 0); logs them to RUN_DIR/notices-ME.jsonl."""

    def __init__(self, run_dir: Path) -> None:
        from horovod.common.elastic import notification_manager

        self.log = run_dir / f"notices-{ME}.jsonl"
        self.added, self.changed = threading.Event(), threading.Event()
        notification_manager.register_listener(self)

    def on_hosts_updated(self, timestamp, update_res) -> None:
        from horovod.runner.elastic.worker import HostUpdateResult

        with open(self.log, "a") as f:
            f.write(json.dumps({"time": time.time(), "update": int(update_res)}) + "\n")
        self.changed.set()
        if update_res & HostUpdateResult.added:
            self.added.set()

    @staticmethod
    def wait(event: threading.Event, what: str) -> None:
        if not event.wait(120):
            raise RuntimeError(f"Horovod said nothing about {what} within 120 s")
        event.clear()


def record_syncs(run_dir: Path) -> None:
    """Make the trainer's elastic state append one line per sync to RUN_DIR/syncs-ME.jsonl."""
    import hvd_easgd.train.trainer as trainer_module

    make = trainer_module.trainer_state_class

    def recording_class():
        base = make()

        class Recording(base):
            def sync(self) -> None:
                super().sync()
                import horovod.torch as hvd

                SYNCS[0] += 1
                t = self.trainer
                line = {"time": time.time(), "rank": hvd.rank(), "size": hvd.size(),
                        "step": t.loop.step, "distance": float(t.opt.local_distance())}
                with open(run_dir / f"syncs-{ME}.jsonl", "a") as f:
                    f.write(json.dumps(line) + "\n")

        return Recording

    trainer_module.trainer_state_class = recording_class


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--hosts-at", action="append", default=[])
    ap.add_argument("--kill-host")
    ap.add_argument("--kill-at", type=int, default=0)
    ap.add_argument("--hold-at", type=int, default=0)
    args = ap.parse_args()
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    record_syncs(run_dir)
    notices = HostNotices(run_dir)
    waited = [-1]  # the sync after which rank 0 last waited for a joiner

    def on_step(step):
        import horovod.torch as hvd

        for change in args.hosts_at:
            at, hosts = change.split("=")
            marker = run_dir / f"hosts-at-{at}"
            if hvd.rank() == 0 and step >= int(at) and not marker.exists():
                notices.changed.clear()
                Path(os.environ["HOSTS_FILE"]).write_text(hosts.replace(",", "\n") + "\n")
                marker.write_text(str(time.time()))
                notices.wait(notices.changed, f"the hosts written after step {at}")
                notices.added.clear()  # this world's commit takes an added host in
                waited[0] = SYNCS[0]
        if args.kill_host == HOST and step >= args.kill_at and not (run_dir / "killed").exists():
            (run_dir / "killed").write_text(str(step))
            os.kill(os.getpid(), signal.SIGKILL)
        if args.hold_at and step == args.hold_at:
            if hvd.rank() == 0:
                (run_dir / "held").write_text(str(step))
            threading.Event().wait()  # until the test kills the job
        if hvd.rank() == 0 and waited[0] != SYNCS[0] and hvd.size() < listed_slots():
            notices.wait(notices.added, "a host added")
            waited[0] = SYNCS[0]

    from hvd_easgd.train.cli import run

    summary = run(load_config(args.config, args.overrides), run_dir=run_dir, resume=args.resume,
                  on_step=on_step)
    import horovod.torch as hvd

    plain = {k: v for k, v in summary.items() if isinstance(v, (int, float, str, type(None)))}
    write_json_atomic(run_dir / f"result-{ME}.json",
                      {**plain, "rank": hvd.rank(), "size": hvd.size(), "host": HOST})


if __name__ == "__main__":
    main()

"""Horovod runtime settings for EASGD jobs, applied before ``hvd.init()``.

EASGD makes one allreduce every ``tau`` steps, so Horovod's background thread has almost
nothing to do. By default it still wakes every millisecond (``HOROVOD_CYCLE_TIME=1``) and, at
every wake-up, agrees with every other worker on what is ready: a small collective over the
network (with Gloo: a TCP round trip per cycle per worker). That negotiation costs CPU and
wake-ups on the cores that train, whether or not a round is pending, and a round gains nothing
from it: a round waits at most one cycle before it starts, i.e. up to ``HOROVOD_CYCLE_TIME`` ms
per ``tau`` steps (hidden entirely in async mode).

Use::

    import horovod.torch as hvd
    from hvd_easgd.optim.tuning import apply_horovod_settings

    apply_horovod_settings()    # before hvd.init(); keeps every variable you set yourself
    hvd.init()

or export the variables yourself (``HOROVOD_CYCLE_TIME=20``, or ``horovodrun --cycle-time-ms 20``).
``HVD_EASGD_TUNE=0`` in the environment turns :func:`apply_horovod_settings` into a no-op (for
measuring Horovod's defaults, or when Horovod is shared with other collectives that need short
cycles). The launchers in ``launch/`` export the same defaults; ``hvd-easgd-train`` applies them.

Every setting and why (the measurements behind them are in ``benchmarks/RESULTS.md``):

- ``HOROVOD_CYCLE_TIME = 20`` (ms; Horovod 0.28's default is 1): fewer background cycles, so
  fewer negotiation round trips and wake-ups competing with compute. Cost: a round starts up to
  one cycle later, which is small against ``tau`` steps of a CPU model in sync mode and
  nothing in async mode. Where a step takes a few tens of milliseconds (GPUs) and rounds are
  frequent (sync mode, ``tau <= 4``), export a shorter cycle (1-5 ms) yourself. A recipe sets
  its own with ``horovod.cycle_time_ms`` (:func:`recipe_settings`), applied by the trainer over
  the launchers' default; a value you exported wins (with a warning when it differs).

Deliberately left alone:

- ``HOROVOD_FUSION_THRESHOLD``: EASGD already hands Horovod one flat buffer per dtype and
  device (one request per round), so there is nothing left to fuse; the threshold only matters
  for many small tensors (``hvd.DistributedOptimizer``'s gradients).
- ``HOROVOD_CACHE_CAPACITY``: the default (1024) already caches the round's few request names.
- Timeouts (``HOROVOD_GLOO_TIMEOUT_SECONDS``, stall checks): correctness, not speed; see
  ``launch/cluster_env.sh``.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Callable, Dict, MutableMapping, Optional

#: Set to 0 / false / no / off to disable :func:`apply_horovod_settings`.
DISABLE_ENV = "HVD_EASGD_TUNE"
#: Comma-separated names the launchers in ``launch/`` set to hvd-easgd's defaults (the user had
#: not set them): a recipe's own value replaces those, but never a value the user exported.
DEFAULTED_ENV = "HVD_EASGD_DEFAULTED"

#: The recommended Horovod environment for EASGD jobs (values are strings, as in os.environ).
#: Keep in sync with the defaults in launch/run_multinode.sh and launch/cluster_env.sh (a test
#: checks it).
HOROVOD_SETTINGS: Dict[str, str] = {
    "HOROVOD_CYCLE_TIME": "20",
}

#: Horovod's own defaults for the same variables (Horovod 0.28.1), for reports.
HOROVOD_DEFAULTS: Dict[str, str] = {
    "HOROVOD_CYCLE_TIME": "1",
}

_FALSE = {"0", "false", "no", "off"}


def enabled(environ: Optional[MutableMapping[str, str]] = None) -> bool:
    """False when ``HVD_EASGD_TUNE`` is 0/false/no/off."""
    environ = os.environ if environ is None else environ
    return environ.get(DISABLE_ENV, "1").strip().lower() not in _FALSE


def horovod_initialized() -> bool:
    """True if ``horovod.torch`` is imported and initialised (without importing it)."""
    mod = sys.modules.get("horovod.torch")
    if mod is None:
        return False
    try:
        return bool(mod.is_initialized())
    except Exception:  # pragma: no cover - a broken or partial import
        return False


def recipe_settings(cycle_time_ms: Optional[float]) -> Dict[str, str]:
    """The Horovod variables a recipe's ``horovod:`` section asks for (``{}`` for null)."""
    if cycle_time_ms is None:
        return {}
    return {"HOROVOD_CYCLE_TIME": f"{float(cycle_time_ms):g}"}


def _same(a: str, b: str) -> bool:
    """The same setting (``"1"`` and ``"1.0"`` are)."""
    try:
        return float(a) == float(b)
    except ValueError:
        return a.strip() == b.strip()


def _defaulted(name: str, environ: MutableMapping[str, str]) -> bool:
    """True if ``name`` holds hvd-easgd's own default (a launcher or an earlier call set it and
    marked it in ``HVD_EASGD_DEFAULTED``), not a value the user chose."""
    marked = {n.strip() for n in environ.get(DEFAULTED_ENV, "").split(",")}
    return name in marked and _same(environ.get(name, ""), HOROVOD_SETTINGS.get(name, ""))


def _apply_recipe(recipe: Dict[str, str], environ: MutableMapping[str, str], overwrite: bool,
                  warn: Callable[[str], None]) -> Dict[str, str]:
    """The recipe's values, over unset variables and hvd-easgd's defaults; a different value
    the user exported (``export``, ``horovodrun --cycle-time-ms``) wins, with a warning that
    names both and how to get the recipe's."""
    applied: Dict[str, str] = {}
    for name, value in recipe.items():
        if overwrite or name not in environ or _defaulted(name, environ):
            environ[name] = value
            applied[name] = value
        elif not _same(environ[name], value):
            warn(f"{name}={environ[name]} from your environment replaces the recipe's "
                 f"horovod.cycle_time_ms={value}; unset {name} to use the recipe's")
    return applied


def _warning(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=4)


def apply_horovod_settings(overwrite: bool = False,
                           environ: Optional[MutableMapping[str, str]] = None,
                           settings: Optional[Dict[str, str]] = None,
                           recipe: Optional[Dict[str, str]] = None,
                           warn: Optional[Callable[[str], None]] = None) -> Dict[str, str]:
    """Put the recommended Horovod settings into the environment; call before ``hvd.init()``.

    A variable that is already set (by you, ``horovodrun -x``/``--cycle-time-ms``, or a
    launcher) is kept unless ``overwrite=True``. ``recipe`` (:func:`recipe_settings`) comes
    first: it replaces hvd-easgd's defaults (``HVD_EASGD_DEFAULTED``) silently, but a different
    value you exported wins, with a warning. Does nothing when ``HVD_EASGD_TUNE=0``
    (a recipe's value included, with a warning). Returns the variables it set,
    ``{name: value}`` (empty if none). Warnings go to ``warn(message)`` (default: a
    ``RuntimeWarning``; the trainer passes them to rank 0 after ``hvd.init()``).

    Horovod reads these variables once, in ``hvd.init()``; called later, this warns and
    changes nothing for the running Horovod.
    """
    environ = os.environ if environ is None else environ
    warn = _warning if warn is None else warn
    if not enabled(environ):
        if recipe:
            warn(f"{DISABLE_ENV}=0: hvd-easgd sets no Horovod variable, so the recipe's "
                 f"{recipe} (horovod.cycle_time_ms) is not applied either")
        return {}
    if horovod_initialized():
        warn("hvd_easgd.optim.tuning.apply_horovod_settings() called after hvd.init(): "
             "Horovod has already read its settings; call it before hvd.init()")
        return {}
    applied = _apply_recipe(recipe or {}, environ, overwrite, warn)
    defaulted = [n for n in environ.get(DEFAULTED_ENV, "").split(",") if n]
    for name, value in (HOROVOD_SETTINGS if settings is None else settings).items():
        if name in (recipe or {}):
            continue
        if overwrite or name not in environ:
            environ[name] = value
            applied[name] = value
            defaulted.append(name)  # ours, not the user's: a later recipe may replace it
    if defaulted:
        environ[DEFAULTED_ENV] = ",".join(dict.fromkeys(defaulted))
    return applied


def late_recipe_warning(recipe: Dict[str, str],
                        environ: Optional[MutableMapping[str, str]] = None) -> Optional[str]:
    """After ``hvd.init()``: why the recipe's values cannot take effect (None if Horovod
    already runs with them)."""
    environ = os.environ if environ is None else environ
    current = effective_settings(environ)
    differ = {n: v for n, v in recipe.items() if not _same(current.get(n, environ.get(n, "")), v)}
    if not differ:
        return None
    return ("Horovod was initialised before hvd_easgd.train.run(): the recipe's "
            + ", ".join(f"{n}={v}" for n, v in differ.items())
            + " (horovod.cycle_time_ms) cannot take effect, Horovod runs with "
            + ", ".join(f"{n}={current.get(n, environ.get(n, ''))}" for n in differ)
            + " (set HOROVOD_CYCLE_TIME before hvd.init())")


def effective_settings(environ: Optional[MutableMapping[str, str]] = None) -> Dict[str, str]:
    """The value Horovod will use for every tuned variable (Horovod's default if unset)."""
    environ = os.environ if environ is None else environ
    return {name: environ.get(name, HOROVOD_DEFAULTS.get(name, "")) for name in HOROVOD_SETTINGS}


def export_lines() -> str:
    """``export NAME=VALUE`` lines of the recommended settings (for shell scripts)."""
    return "\n".join(f"export {k}={v}" for k, v in HOROVOD_SETTINGS.items())


if __name__ == "__main__":  # python -m hvd_easgd.optim.tuning: print the exports
    print(export_lines())

"""Training configuration: a typed schema, YAML recipes with `_base_` inheritance, `--set` overrides.

The schema is a tree of dataclasses (OmegaConf structured configs). A recipe is a YAML file whose
keys must exist in the schema; `_base_: ../base.yaml` (a path relative to the recipe, or a list of
paths, merged in order) makes it inherit another recipe, and bases may have bases. Command-line
overrides are OmegaConf dotlist entries (`optimizer.lr=0.01`, `data.fake_image_shape=[3,8,8]`).

Order of precedence, lowest first: schema defaults, the deepest base, ..., the recipe, `--set`.

Every problem (an unknown key, a value of the wrong type, a required key left unset, a value that is
not one of the allowed choices, a `_base_` cycle or missing file) raises `ConfigError`, whose message
names where the bad value came from and lists the valid keys of that section.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import yaml
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

BASE_KEY = "_base_"

#: The algorithm's methods and modes (``hvd_easgd.optim.METHODS``, ``CENTER_AVERAGES``,
#: ``MODES``), spelled here because this module loads without torch or Horovod; a test keeps
#: them equal to the algorithm's.
ALGORITHM_METHODS = ("easgd", "downpour", "mdownpour", "average", "diloco")
CENTER_AVERAGES = ("running", "moving")
MODES = ("sync", "async")

#: What only the trainer adds on top of an algorithm method: EAMSGD's local Nesterov momentum,
#: downpour evaluated and shipped as the running / moving average of its center.
TRAINER_VARIANTS = {
    "easgd": {"eamsgd": ("easgd", True, None)},
    "downpour": {"adownpour": ("downpour", False, "running"),
                 "mvadownpour": ("downpour", False, "moving")},
}
#: optimizer.method -> (the algorithm's method, local Nesterov momentum, the center average that
#: is evaluated and shipped): each algorithm method under its own name, then its variants.
ELASTIC_METHODS = {name: how for m in ALGORITHM_METHODS
                   for name, how in {m: (m, False, None), **TRAINER_VARIANTS.get(m, {})}.items()}
#: Methods only the trainer has: Horovod's synchronous SGD, and one model per worker with no
#: communication at all (plain and Nesterov-momentum SGD).
SYNC_METHOD = "sync_sgd"
SINGLE_WORKER_METHODS = ("sgd", "msgd")
METHODS = (*ELASTIC_METHODS, SYNC_METHOD, *SINGLE_WORKER_METHODS)
LOCAL_OPTIMIZERS = ("sgd", "adamw")
DATASETS = ("digits", "cifar10", "imagenet", "fake")
IMAGENET_AUGMENTS = ("overfeat", "resized_crop")  # data.augment (hvd_easgd/train/data.py has the same)
SCHEDULES = ("constant", "step", "cosine")
COMPRESSIONS = ("none", "fp16")
DEVICES = ("auto", "cpu", "cuda")
DEFAULT_BETA = 0.9  # optimizer.beta's default (recipes/base.yaml repeats it)


class ConfigError(ValueError):
    """A recipe or an override is wrong; the message says where and what is valid."""


# --------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    name: str = "digits"  # digits | cifar10 | imagenet | fake
    root: Optional[str] = None  # dataset directory (cifar10: torchvision layout; imagenet: train/ val/)
    download: bool = False  # cifar10 only: let torchvision download into `root`
    image_size: Optional[int] = None  # crop size fed to the model (None: the dataset's default)
    augment: Optional[str] = None  # imagenet only: overfeat (the default) | resized_crop; see hvd_easgd/train/data.py
    num_workers: int = 0  # DataLoader worker processes per Horovod worker (0: exact resume)
    fake_train_size: int = 1024
    fake_test_size: int = 256
    fake_image_shape: List[int] = field(default_factory=lambda: [3, 32, 32])
    fake_num_classes: int = 10


@dataclass
class ModelConfig:
    name: str = MISSING  # cifar_paper | imagenet_paper | digits_net | resnet18 | resnet34 | resnet50
    dropout: float = 0.5


@dataclass
class ScheduleConfig:
    name: str = "constant"  # constant | step | cosine
    warmup_epochs: float = 0.0  # linear warm-up from warmup_start_factor * lr to lr
    warmup_start_factor: float = 0.1
    milestones: List[float] = field(default_factory=list)  # step: epochs at which lr *= gamma
    gamma: float = 0.1
    min_lr: float = 0.0  # cosine: final learning rate


@dataclass
class OptimizerConfig:
    method: str = "easgd"  # see METHODS
    mode: str = "sync"  # sync | async
    lr: float = MISSING  # learning rate eta of the local optimizer
    tau: int = 1  # communication period (steps between rounds)
    beta: Optional[float] = DEFAULT_BETA  # moving rate of the center, alpha = beta/p (diloco: null)
    alpha: Optional[float] = None  # give alpha instead of beta (then set beta: null)
    momentum: float = 0.99  # delta: Nesterov momentum (eamsgd, msgd, sync_sgd) or master momentum (mdownpour)
    weight_decay: float = 0.0  # L2 weight decay of the local optimizer
    moving_rate: float = 0.001  # mvadownpour: rate of the moving average of the center
    compression: str = "none"  # none | fp16 (communication only; the center stays fp32)
    average_buffers: bool = True  # average floating-point buffers (BatchNorm statistics) each round
    start_early: bool = True  # sync easgd/eamsgd: start a round's allreduce when the step before it ends
    local_optimizer: str = "sgd"  # sgd | adamw (DiLoCo's inner optimizer; momentum is then unused)
    outer_lr: float = 0.7  # diloco: learning rate of the outer Nesterov SGD that moves the center
    outer_momentum: float = 0.9  # diloco: its momentum
    hierarchy: Optional[str] = None  # null | host | explicit groups of ranks, "0,1;2,3": sync SGD inside a group, EASGD between groups
    nonfinite_patience: int = 3  # bad rounds among the last 2x (optimizer) / steps in a row (training loss) with NaN/inf before stopping
    sync_sgd_steps: int = 0  # elastic methods: synchronous SGD (gradients averaged) for this many steps first, then EASGD
    survivors: str = "own"  # elastic jobs: what survivors of a membership change train on: own | center
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)


@dataclass
class TrainConfig:
    batch_size: int = 128  # per worker
    epochs: float = 1.0  # passes over each worker's shard; ignored when max_steps is set
    max_steps: Optional[int] = None  # total local steps per worker
    max_time: Optional[float] = None  # seconds of training (wall_time); stop at the first check past it
    seed: int = 0  # data order, dropout and, unless init_seed is set, the model's initialisation
    init_seed: Optional[int] = None  # the model's initialisation alone (sweeps: same init, other data orders)
    device: str = "auto"  # auto | cpu | cuda (cuda: one GPU per worker, by local rank)
    threads: int = 0  # torch intra-op threads per worker (0: leave torch's default)
    eval_every: int = 0  # steps between evaluations (0: only at the end)
    eval_batch_size: int = 256
    eval_local: bool = True  # also evaluate each worker's local model (averaged over workers)
    max_eval_batches: Optional[int] = None  # cap per worker, for smoke tests
    divergence_factor: float = 10.0  # stop when train/loss > this x ln(classes) (chance) for nonfinite_patience log events; 0: never


@dataclass
class LogConfig:
    every: int = 20  # steps between training-loss / throughput / communication log events
    tensorboard: bool = True
    progress: bool = True  # a tqdm bar on rank 0 when its stderr is a terminal (not under horovodrun)
    console_seconds: float = 15.0  # seconds between progress lines (under horovodrun / in a log file)
    quiet: bool = False  # no progress or evaluation lines: warnings, errors and the final summary only


@dataclass
class CheckpointConfig:
    every: int = 0  # steps between checkpoints (0: only at the end)
    keep: int = 2  # newest checkpoints kept in the run directory
    at_end: bool = True
    export_center: bool = True  # write center.pt (a plain state_dict) at the end


@dataclass
class ElasticConfig:
    enabled: bool = False  # train under hvd.elastic.run (launch with launch/run_elastic.sh)
    commit_every: int = 20  # steps between in-memory commits (what a lost worker rolls back to)
    min_np: Optional[int] = None  # fewest workers to keep training with (run_elastic.sh: --min-np)
    max_np: Optional[int] = None  # most workers to grow to (run_elastic.sh: --max-np)


@dataclass
class LaunchConfig:
    np: Optional[int] = None  # intended number of workers; the trainer warns if hvd.size() differs
    hosts: Optional[str] = None  # informational: the -H argument the recipe was written for


@dataclass
class HorovodConfig:
    """Horovod's runtime settings, applied by the trainer before hvd.init() (hvd_easgd/optim/tuning.py)."""

    # ms between Horovod's background cycles (HOROVOD_CYCLE_TIME); a value you export wins (with a
    # warning); null: hvd-easgd's default (hvd_easgd/optim/tuning.py, 20 ms)
    cycle_time_ms: Optional[float] = None


@dataclass
class SweepConfig:
    """Read by `hvd-easgd-sweep` only (hvd_easgd/train/sweep.py); the trainer ignores it."""

    lrs: List[float] = field(default_factory=list)  # optimizer.lr values to try (empty: no grid)
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2])  # train.seed (data order) per run


@dataclass
class Config:
    name: Optional[str] = None  # run name (default: the recipe's file name without .yaml)
    run_dir: Optional[str] = None  # default: runs/<name>
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    elastic: ElasticConfig = field(default_factory=ElasticConfig)
    horovod: HorovodConfig = field(default_factory=HorovodConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)


# --------------------------------------------------------------------------------------------
# Helpers on the schema
# --------------------------------------------------------------------------------------------


def _section_fields(cls) -> Dict[str, Any]:
    """{field name: resolved type} of a schema dataclass."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _is_section_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _section_class(path: Sequence[str]):
    """The dataclass of the section at `path` (() is the root), or None if path is not a section."""
    cls = Config
    for part in path:
        tp = _section_fields(cls).get(part)
        if not _is_section_type(tp):
            return None
        cls = tp
    return cls


def valid_keys(section: Union[str, Sequence[str]] = ()) -> List[str]:
    """The valid keys of a section, e.g. valid_keys("optimizer") or valid_keys("optimizer.schedule")."""
    path = [p for p in section.split(".") if p] if isinstance(section, str) else list(section)
    cls = _section_class(path)
    if cls is None:
        return []
    return [f.name for f in dataclasses.fields(cls)]


def _describe_section(path: Sequence[str]) -> str:
    name = ".".join(path) if path else "the top level"
    keys = valid_keys(path)
    return f"valid keys of {name!s}: {', '.join(keys)}"


def _check_structure(raw: Any, source: str, path: Sequence[str] = ()) -> None:
    """Unknown keys and scalars given where a section is expected, with friendly messages."""
    cls = _section_class(path)
    if cls is None:
        return
    where = ".".join(path) if path else "the top level"
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{source}: '{where}' must be a mapping (a section), got {type(raw).__name__} {raw!r}; "
            f"{_describe_section(path)}"
        )
    fields = _section_fields(cls)
    for key, value in raw.items():
        if key not in fields:
            full = ".".join([*path, str(key)])
            hint = _close_match(str(key), list(fields))
            raise ConfigError(
                f"{source}: unknown key '{full}'{hint}; {_describe_section(path)}"
            )
        if _is_section_type(fields[key]):
            _check_structure(value, source, [*path, key])


def _close_match(key: str, options: Sequence[str]) -> str:
    import difflib

    match = difflib.get_close_matches(key, options, n=1)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _merge(cfg: DictConfig, raw: Dict[str, Any], source: str) -> DictConfig:
    _check_structure(raw, source)
    try:
        return OmegaConf.merge(cfg, raw)
    except OmegaConfBaseException as e:  # wrong types and anything the structure check missed
        raise _wrap(e, source) from None


def _wrap(e: OmegaConfBaseException, source: str) -> ConfigError:
    full_key = getattr(e, "full_key", None) or ""
    first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
    parts = [p for p in str(full_key).split(".") if p]
    # the section is the longest prefix of the key that is a section of the schema
    section: List[str] = []
    for i in range(len(parts), -1, -1):
        if _section_class(parts[:i]) is not None:
            section = parts[:i]
            break
    where = f" at '{full_key}'" if full_key else ""
    return ConfigError(f"{source}{where}: {first_line}; {_describe_section(section)}")


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _read_yaml(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"recipe not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping at the top level, got {type(data).__name__}")
    return data


def _recipe_chain(path: Path, _seen: Optional[List[Path]] = None) -> List[tuple]:
    """[(path, raw dict without _base_)] from the deepest base to `path` itself."""
    path = path.resolve()
    seen = list(_seen or [])
    if path in seen:
        cycle = " -> ".join(str(p) for p in [*seen, path])
        raise ConfigError(f"_base_ cycle: {cycle}")
    seen.append(path)
    raw = _read_yaml(path)
    bases = raw.pop(BASE_KEY, None)
    if bases is None:
        bases = []
    elif isinstance(bases, str):
        bases = [bases]
    elif not (isinstance(bases, list) and all(isinstance(b, str) for b in bases)):
        raise ConfigError(f"{path}: {BASE_KEY} must be a path or a list of paths, got {bases!r}")
    chain: List[tuple] = []
    for base in bases:
        base_path = Path(base)
        if not base_path.is_absolute():
            base_path = path.parent / base_path
        if not base_path.is_file():
            raise ConfigError(f"{path}: {BASE_KEY} file not found: {base} (resolved to {base_path})")
        chain.extend(_recipe_chain(base_path, seen))
    chain.append((path, raw))
    return chain


def load_config(
    path: Optional[Union[str, os.PathLike]] = None,
    overrides: Sequence[str] = (),
    *,
    validate_config: bool = True,
) -> DictConfig:
    """Schema defaults <- recipe chain (`_base_`) <- dotlist overrides; validated; returns DictConfig."""
    cfg = OmegaConf.structured(Config)
    chain = [(str(p), raw) for p, raw in _recipe_chain(Path(path))] if path is not None else []
    for source, raw in chain:
        cfg = _merge(cfg, raw, source)
    if path is not None and cfg.name is None:
        cfg = _merge(cfg, {"name": Path(path).stem}, f"{path} (its file name)")
    cfg = apply_overrides(cfg, overrides)
    if validate_config:
        cfg = _settle_diloco_beta(cfg, chain, [_override(item) for item in overrides])
        validate(cfg)
    return cfg


def config_from_dict(data: Dict[str, Any], overrides: Sequence[str] = (), *, source: str = "config") -> DictConfig:
    """Same checks as load_config, for a config given as a (nested) dict."""
    data = dict(data)
    data.pop(BASE_KEY, None)
    cfg = _merge(OmegaConf.structured(Config), data, source)
    cfg = apply_overrides(cfg, overrides)
    cfg = _settle_diloco_beta(cfg, [(source, data)], [_override(item) for item in overrides])
    validate(cfg)
    return cfg


def apply_overrides(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    for item in overrides:
        source, dot = _override(item)
        cfg = _merge(cfg, dot, source)
    return cfg


def _override(item: str) -> tuple:
    """``(source, nested dict)`` of one ``--set KEY=VALUE``; ConfigError if it is malformed."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set optimizer.lr=0.01")
    key = item.split("=", 1)[0].strip()
    try:
        dot = OmegaConf.to_container(OmegaConf.from_dotlist([item]))
    except OmegaConfBaseException as e:
        raise ConfigError(f"--set {item!r}: {str(e).splitlines()[0]}") from None
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"--set {item!r}: bad key {key!r}; {_describe_section(())}")
    return f"--set {item}", dot


def _settle_diloco_beta(cfg: DictConfig, recipes: Sequence[tuple], sets: Sequence[tuple]) -> DictConfig:
    """DiLoCo has no elastic coefficient: refuse an ``optimizer.beta`` given for it, drop one it
    only inherits.

    ``recipes`` (the chain from the deepest base) and ``sets`` (each ``--set``) are ``(source,
    mapping)`` in merge order. When the method ends up diloco and beta a number, that number is
    *given for DiLoCo* if the last layer naming beta is a ``--set``, or the recipe from which the
    method is diloco, or a later one: ConfigError, naming that layer and what to tune instead.
    Otherwise it was meant for another method (recipes/base.yaml's 0.9 for EASGD, the schema's
    default) and the returned config has ``beta: null``, which ``--print-config`` and saved configs show.
    One exception keeps configs saved before this check loading (config.yaml, checkpoints): 0.9
    next to ``method: diloco`` in the same recipe is taken for that inherited default."""
    o, layers = cfg.optimizer, [*recipes, *sets]
    if o.method != "diloco" or o.beta is None:
        return cfg
    named = [i for i, (_, raw) in enumerate(layers) if "beta" in _optimizer_keys(raw)]
    last, since = (named[-1] if named else -1), _diloco_since(layers)
    if last >= len(recipes) or last > since or (last == since and o.beta != DEFAULT_BETA):
        raise ConfigError(
            f"{layers[last][0]}: optimizer.method=diloco takes no optimizer.beta (got {o.beta}): "
            f"it has no elastic coefficient (every worker restarts from the center each round), "
            f"so beta would be ignored. Tune the outer step that moves the center instead, "
            f"optimizer.outer_lr (now {o.outer_lr}) and optimizer.outer_momentum (now "
            f"{o.outer_momentum}), and remove optimizer.beta (or set it to null)")
    return _merge(cfg, {"optimizer": {"beta": None}}, "diloco's inherited optimizer.beta")


def _optimizer_keys(raw: Any) -> Dict[str, Any]:
    section = raw.get("optimizer") if isinstance(raw, dict) else None
    return section if isinstance(section, dict) else {}


def _diloco_since(layers: Sequence[tuple]) -> int:
    """The index of the layer from which ``optimizer.method`` is diloco to the end."""
    since = len(layers)
    for i in reversed(range(len(layers))):
        method = _optimizer_keys(layers[i][1]).get("method")
        if method not in (None, "diloco"):
            break
        if method == "diloco":
            since = i
    return since


#: numeric keys: "> 0" (positive), ">= 0" (non-negative), "... or null" (may be unset)
_NUMBER_RULES = {
    "optimizer.lr": "> 0", "optimizer.tau": "> 0", "optimizer.alpha": "> 0 or null",
    "optimizer.weight_decay": ">= 0", "optimizer.momentum": ">= 0", "optimizer.sync_sgd_steps": ">= 0",
    "optimizer.schedule.warmup_epochs": ">= 0",
    "train.batch_size": "> 0", "train.eval_batch_size": "> 0", "train.epochs": "> 0",
    "train.max_steps": "> 0 or null", "train.max_time": "> 0 or null",
    "train.init_seed": ">= 0 or null", "train.eval_every": ">= 0", "train.max_eval_batches": "> 0 or null",
    "log.every": "> 0", "checkpoint.every": ">= 0", "checkpoint.keep": "> 0", "launch.np": "> 0 or null",
    "horovod.cycle_time_ms": "> 0 or null",
    "optimizer.nonfinite_patience": "> 0", "elastic.commit_every": "> 0",
    "train.divergence_factor": ">= 0", "log.console_seconds": ">= 0",
    "elastic.min_np": "> 0 or null", "elastic.max_np": "> 0 or null",
}
#: how to fix a number out of range, where the rule alone does not say
_NUMBER_HINTS = {
    "horovod.cycle_time_ms": " (milliseconds between Horovod's cycles, e.g. 1 for a small model with "
                             "frequent rounds; null: HOROVOD_CYCLE_TIME from the environment, else 20)",
}


def validate(cfg: DictConfig) -> None:
    """Required keys present, choices valid, numbers in range."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        first = missing[0].split(".")
        raise ConfigError(
            f"required key(s) not set: {', '.join(missing)}; set them in the recipe or with "
            f"--set KEY=VALUE; {_describe_section(first[:-1])}"
        )

    def choice(key: str, value, options):
        if value not in options:
            section = key.split(".")[:-1]
            raise ConfigError(
                f"'{key}' is {value!r}; valid values: {', '.join(options)} ({_describe_section(section)})"
            )

    choice("optimizer.method", cfg.optimizer.method, METHODS)
    choice("optimizer.mode", cfg.optimizer.mode, MODES)
    choice("optimizer.local_optimizer", cfg.optimizer.local_optimizer, LOCAL_OPTIMIZERS)
    if cfg.optimizer.method == "diloco" and cfg.optimizer.alpha is not None:
        raise ConfigError(
            "optimizer.method=diloco has no elastic coefficient (workers restart from the center "
            "every round): set optimizer.alpha to null and tune optimizer.outer_lr / "
            "optimizer.outer_momentum instead (optimizer.beta does not apply either)"
        )
    parse_hierarchy(cfg.optimizer.hierarchy)
    choice("optimizer.survivors", cfg.optimizer.survivors, ("own", "center"))
    if cfg.elastic.enabled and cfg.optimizer.hierarchy is not None:
        raise ConfigError(
            "optimizer.hierarchy cannot be used with elastic.enabled=true: Horovod Elastic "
            "changes the workers, and the hierarchy's groups and process sets would no longer "
            "match them. Use flat EASGD for elastic jobs (--set optimizer.hierarchy=null), or "
            "keep the hierarchy and launch without elastic (launch/run_multinode.sh)")
    if cfg.optimizer.outer_lr <= 0 or not 0 <= cfg.optimizer.outer_momentum < 1:
        raise ConfigError("'optimizer.outer_lr' must be > 0 and 'optimizer.outer_momentum' in [0, 1)")
    choice("optimizer.compression", cfg.optimizer.compression, COMPRESSIONS)
    choice("optimizer.schedule.name", cfg.optimizer.schedule.name, SCHEDULES)
    choice("data.name", cfg.data.name, DATASETS)
    if cfg.data.augment is not None:
        if cfg.data.name != "imagenet":
            raise ConfigError(f"'data.augment' applies to data.name=imagenet only (got data.name="
                              f"{cfg.data.name}); remove it or set it to null")
        choice("data.augment", cfg.data.augment, IMAGENET_AUGMENTS)
    choice("train.device", cfg.train.device, DEVICES)

    for key, rule in _NUMBER_RULES.items():
        value = OmegaConf.select(cfg, key)
        if value is None and rule.endswith("or null"):
            continue
        if value is None or value < 0 or (value == 0 and rule.startswith("> 0")):
            raise ConfigError(f"'{key}' must be {rule}, got {value!r}{_NUMBER_HINTS.get(key, '')}")
    if cfg.optimizer.momentum >= 1:
        raise ConfigError(f"'optimizer.momentum' must be < 1, got {cfg.optimizer.momentum}")
    beta, alpha = cfg.optimizer.beta, cfg.optimizer.alpha
    if beta is not None and alpha is not None:
        raise ConfigError(
            "give optimizer.beta or optimizer.alpha, not both (alpha = beta / p); "
            "set the other to null, e.g. --set optimizer.beta=null"
        )
    if beta is not None and not 0 < beta <= 1:
        raise ConfigError(f"'optimizer.beta' must lie in (0, 1], got {beta}")
    if not 0 < cfg.optimizer.moving_rate <= 1:
        raise ConfigError(f"'optimizer.moving_rate' must lie in (0, 1], got {cfg.optimizer.moving_rate}")
    if not 0 < cfg.optimizer.schedule.warmup_start_factor <= 1:
        raise ConfigError("'optimizer.schedule.warmup_start_factor' must lie in (0, 1]")
    if list(cfg.optimizer.schedule.milestones) != sorted(cfg.optimizer.schedule.milestones):
        raise ConfigError("'optimizer.schedule.milestones' must be increasing (epochs)")
    _validate_sweep(cfg)
    lo, hi = cfg.elastic.min_np, cfg.elastic.max_np
    if lo is not None and hi is not None and lo > hi:
        raise ConfigError(f"'elastic.min_np' ({lo}) must be <= 'elastic.max_np' ({hi})")
    if cfg.data.name == "fake" and len(cfg.data.fake_image_shape) != 3:
        raise ConfigError(
            f"'data.fake_image_shape' must be [channels, height, width], got {list(cfg.data.fake_image_shape)}"
        )


def parse_hierarchy(value: Optional[str]):
    """``optimizer.hierarchy``: None, ``"host"`` or groups of ranks ``"0,1;2,3"`` as lists.

    Explicit groups get every check that needs no world size
    (:func:`hvd_easgd.optim.hierarchy.check_group_shape`: ranks >= 0, none twice, groups of one size),
    so a bad hierarchy is a ConfigError before launch. That imports horovod.torch (only then,
    and without initialising Horovod); the ranks against the job's size are checked at start."""
    if value is None or value == "host":
        return value
    try:
        groups = [[int(r) for r in group.split(",")] for group in str(value).split(";")]
    except ValueError:
        raise ConfigError(
            f"'optimizer.hierarchy' is {value!r}; use null, host, or groups of ranks separated "
            f"by ';', e.g. '0,1;2,3'") from None
    from hvd_easgd.optim import check_group_shape

    try:
        return check_group_shape(groups)
    except ValueError as e:
        raise ConfigError(f"'optimizer.hierarchy' is {value!r}: {e}; in a recipe or --set, "
                          f"groups of ranks separated by ';', e.g. '0,1;2,3'") from None


def _validate_sweep(cfg: DictConfig) -> None:
    lrs, seeds = list(cfg.sweep.lrs), list(cfg.sweep.seeds)
    if any(lr <= 0 for lr in lrs):
        raise ConfigError(f"'sweep.lrs' must hold learning rates > 0, got {lrs}")
    if any(s < 0 for s in seeds):
        raise ConfigError(f"'sweep.seeds' must hold seeds >= 0, got {seeds}")
    for key, values in (("sweep.lrs", lrs), ("sweep.seeds", seeds)):
        if len(set(values)) != len(values):
            raise ConfigError(f"'{key}' lists a value twice: {values}; list each once")
    if not seeds:
        raise ConfigError("'sweep.seeds' is empty; give at least one seed, e.g. [0, 1, 2]")


def with_run_dir(cfg: DictConfig, run_dir: Union[str, os.PathLike]) -> DictConfig:
    """A copy of `cfg` whose ``run_dir`` is `run_dir` (the one a run decided to write to)."""
    return OmegaConf.merge(cfg, {"run_dir": str(run_dir)})


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def to_dict(cfg: DictConfig) -> Dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def save_config(cfg: DictConfig, path: Union[str, os.PathLike]) -> None:
    """Write the resolved config as YAML, atomically. `load_config(path)` reads it back."""
    from hvd_easgd.train.checkpoint import atomic_write_bytes

    atomic_write_bytes(Path(path), to_yaml(cfg).encode("utf-8"))


def diff_configs(a: DictConfig, b: DictConfig) -> List[str]:
    """Dotted keys whose values differ between two configs."""
    fa, fb = _flatten(to_dict(a)), _flatten(to_dict(b))
    return sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))


def _flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


__all__ = [
    "Config", "DataConfig", "ModelConfig", "OptimizerConfig", "ScheduleConfig", "TrainConfig",
    "LogConfig", "CheckpointConfig", "LaunchConfig", "HorovodConfig", "SweepConfig", "ConfigError", "load_config",
    "config_from_dict", "apply_overrides", "validate", "valid_keys", "save_config", "to_yaml",
    "to_dict", "diff_configs", "with_run_dir", "METHODS", "MODES", "ELASTIC_METHODS", "SYNC_METHOD",
    "SINGLE_WORKER_METHODS", "DictConfig", "ListConfig",
]

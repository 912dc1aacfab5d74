"""Training configuration: a common section plus one section per strategy, frozen and validated on construction.

Each setting is declared once, as a field of its section (help text, valid values, check, and which
strategies read it). The `mpisgd train` flags, their argument groups and the config-file keys are
generated from these fields (name -> --name-with-dashes). Precedence: defaults < config file (TOML or
JSON, keys are setting names) < command-line flags. An unknown key is an error naming it; so is a
setting given explicitly to a strategy that ignores it.

Lists of valid values come from the modules that own them (all-reduce algorithms from `mpisgd.comm`,
server rules from `mpisgd.downpour.rules`, schedules from `mpisgd.sync.schedule`, strategies from
`mpisgd.training.registry`); they are imported on first validation, since their owners load MPI or torch.

Strategies read ``cfg.<setting>`` (``cfg.batch_size``, ``cfg.servers``): the flat name is delegated to
the section that holds it, read-only.
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Mapping
from dataclasses import MISSING, Field, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Optional

from mpisgd.errors import ConfigError
from mpisgd.training.registry import STRATEGIES, strategies_reading

ON_NONFINITE = ("stop", "skip")
DEVICES = ("cpu", "cuda")
OPTIMIZERS = ("sgd", "lars")

Choices = Callable[[], tuple]
Check = Callable[[Any], Optional[str]]


def _owned(module: str, name: str, *, keys: bool = False) -> Choices:
    """The valid values kept by ``module.name`` (a tuple, or a dict's keys), imported when needed."""
    def choices() -> tuple:
        values = getattr(importlib.import_module(module), name)
        return tuple(values.keys() if keys else values)
    return choices


def _fixed(values: tuple) -> Choices:
    return lambda: values


def positive(value: Any) -> Optional[str]:
    finite = not isinstance(value, float) or math.isfinite(value)  # an lr of inf is no learning rate
    return None if value > 0 and finite else f"must be positive, got {value}"


def non_negative(value: Any) -> Optional[str]:
    finite = not isinstance(value, float) or math.isfinite(value)  # math.isfinite fails on a 400-digit int
    return None if value >= 0 and finite else f"must be >= 0, got {value}"


def positive_or_none(value: Any) -> Optional[str]:
    return None if value is None else positive(value)


def non_negative_or_none(value: Any) -> Optional[str]:
    return None if value is None else non_negative(value)


def _balance_problem(value: Any) -> Optional[str]:
    if value in ("params", "time", "uniform"):
        return None
    try:
        counts = _ints(value)
    except ValueError:
        counts = ()
    return None if counts and min(counts) > 0 else f"must be params, time, uniform or layer counts, got {value!r}"


def fraction_or_none(value: Any) -> Optional[str]:
    return None if value is None or 0 < value <= 1 else f"must be in (0, 1], got {value}"


def niceness(value: Any) -> Optional[str]:
    return None if 0 <= value <= 19 else f"must be in 0..19, got {value}"


MAX_WIDTH = 2**20  # a sane bound: a wider layer is a typo, and allocating it would take the rank down
MAX_SEED = 2**63 - 1  # torch.manual_seed takes at most 64 bits


def widths(value: Any) -> Optional[str]:
    if value and min(value) > 0 and max(value) <= MAX_WIDTH:
        return None
    return f"must list positive widths of at most {MAX_WIDTH}, got {value}"


def seed_value(value: Any) -> Optional[str]:
    return None if 0 <= value <= MAX_SEED else f"must be in 0..{MAX_SEED}, got {value}"


def _opt(default: Any, help: str, *, choices: Optional[Choices] = None, kind: Any = None,
         check: Optional[Check] = None, used_by: Optional[tuple] = None, const: Any = None) -> Any:
    """A setting: ``used_by`` names the strategies that read it (default: those of its section)."""
    return field(default=default, metadata={"help": help, "choices": choices, "kind": kind, "check": check,
                                            "used_by": used_by,
                                            "const": const})


def resume_value(value: Any) -> Any:
    """``--resume`` as given: True (the latest checkpoint, which must exist), False, "auto" (the newest
    valid checkpoint if there is any, else a fresh start) or the path of a checkpoint file."""
    if isinstance(value, bool):
        return value
    text = str(value)
    if text.lower() in ("true", "yes", "latest"):
        return True
    if text.lower() in ("false", "no", ""):
        return False
    return text


def _ints(text: str) -> tuple:
    return tuple(int(v) for v in str(text).split(",") if v.strip())


def _floats(text: str) -> tuple:
    return tuple(float(v) for v in str(text).split(",") if v.strip())


def _validate(section: Any) -> None:
    """Every field's valid values and check, in declaration order; the first problem is the error."""
    for f in fields(section):
        value = getattr(section, f.name)
        choices = f.metadata.get("choices")
        if choices is not None and value not in choices():
            raise ConfigError(f"{flag(f.name)} must be one of {', '.join(choices())}, got {value!r}")
        check = f.metadata.get("check")
        problem = check(value) if check is not None else None
        if problem:
            raise ConfigError(f"{flag(f.name)} {problem}")


class _Section:
    """A config section: its settings are checked as it is built, so no invalid section exists."""

    def __post_init__(self) -> None:
        _validate(self)


GRADIENT_STRATEGIES = ("sync", "downpour", "dcasgd", "sync-ps")  # step-wise SGD: epochs, lr, steps, logging
SERVER_STRATEGIES = ("downpour", "dcasgd", "sandblaster", "sync-ps")  # ranks split into servers and workers


@dataclass(frozen=True)
class CommonConfig(_Section):
    """What every strategy reads (a few settings only the step-wise or the server strategies read)."""

    strategy: str = _opt("sync", "training strategy", choices=lambda: tuple(STRATEGIES))
    model: str = _opt("mlp", "built-in model", choices=_owned("mpisgd.models", "MODELS", keys=True))
    hidden: tuple = _opt((256, 128), "hidden layer widths of mlp, e.g. 256,128", kind=_ints, check=widths)
    data: Optional[str] = _opt(None, "training HDF5 file with datasets x and y (default: the built-in "
                               "'mpisgd-shapes' set, generated offline on first use)")
    val: Optional[str] = _opt(None, "validation HDF5 file of the same shape (default: the built-in set's)")
    num_classes: Optional[int] = _opt(None, "number of classes; every label must be below it (default: the "
                                      "file's num_classes attribute, else the largest label + 1, either at "
                                      "most 100000)", check=positive_or_none)
    epochs: int = _opt(5, "epochs to train", check=positive, used_by=GRADIENT_STRATEGIES)
    max_steps: Optional[int] = _opt(None, "stop after this many optimizer steps in total (counts across --resume; "
                                    "per worker in downpour/dcasgd)", check=positive_or_none,
                                    used_by=GRADIENT_STRATEGIES)
    batch_size: int = _opt(32, "per-rank batch size (global batch = ranks x this)", check=positive)
    lr: float = _opt(0.1, "base learning rate for --reference-batch; scaled linearly to the global batch",
                     check=positive, used_by=GRADIENT_STRATEGIES)
    weight_decay: float = _opt(1e-4, "weight decay (L2)", check=non_negative)
    seed: int = _opt(0, "seed for initialization and shuffling (the same on every rank)", check=seed_value)
    checkpoint_dir: Optional[str] = _opt(None, "directory for checkpoints (written atomically by rank 0)")
    checkpoint_every: int = _opt(0, "also checkpoint every N steps (0: only at the end of each epoch)",
                                 check=non_negative, used_by=GRADIENT_STRATEGIES)
    resume: Any = _opt(False, "continue from the latest checkpoint in --checkpoint-dir; '--resume auto': from the "
                       "newest valid one, or start fresh when there is none (one command starts and continues a "
                       "job); '--resume PATH': from that file", kind=resume_value, const=True)
    keep_checkpoints: int = _opt(0, "keep only the newest N numbered checkpoints (0: keep all)", check=non_negative)
    metrics: Optional[str] = _opt(None, "JSONL metrics file (written by rank 0)")
    log_every: int = _opt(10, "log training loss every N steps", check=positive, used_by=GRADIENT_STRATEGIES)
    target_accuracy: Optional[float] = _opt(None, "stop once validation accuracy reaches this (0..1]",
                                            check=fraction_or_none, used_by=GRADIENT_STRATEGIES)
    on_nonfinite: str = _opt("stop", "on a NaN/Inf gradient: stop with an error, or skip the step",
                             choices=_fixed(ON_NONFINITE), used_by=GRADIENT_STRATEGIES)
    device: str = _opt("cpu", "cpu, or cuda (one GPU per node-local rank)", choices=_fixed(DEVICES))
    share_gpus: bool = _opt(False, "allow more ranks per node than GPUs with --device cuda")
    progress: bool = _opt(True, "progress bar on rank 0 (when stderr is a terminal and the strategy has one)")
    servers: int = _opt(1, "number of parameter-server shard ranks", check=positive, used_by=SERVER_STRATEGIES)
    worker_timeout: float = _opt(30.0, "seconds without a heartbeat before a worker counts as dead",
                                 check=positive, used_by=SERVER_STRATEGIES)


@dataclass(frozen=True)
class SyncConfig(_Section):
    """Synchronous large-minibatch SGD (Goyal et al. 2017; LARS, You et al. 2017)."""

    reference_batch: int = _opt(256, "batch size at which --lr applies (Goyal et al.: 256)", check=positive,
                                used_by=("sync", "sync-ps"))
    warmup_epochs: float = _opt(0.0, "gradual warm-up length in epochs (Goyal et al.: 5)", check=non_negative)
    warmup_start_factor: Optional[float] = _opt(None, "first warm-up lr as a fraction of the target "
                                                "(default 1/k for a k-times larger batch)", check=fraction_or_none)
    schedule: str = _opt("constant", "learning-rate decay after warm-up",
                         choices=_owned("mpisgd.sync.schedule", "SCHEDULES"))
    milestones: tuple = _opt((), "epochs where the step schedule multiplies the lr by --gamma, e.g. 30,60",
                             kind=_floats)
    gamma: float = _opt(0.1, "step schedule decay factor", check=non_negative)
    momentum: float = _opt(0.9, "momentum", check=non_negative, used_by=("sync", "sync-ps"))
    no_decay_bias_bn: bool = _opt(False, "no weight decay (and no LARS trust ratio) on biases and norm layers")
    optimizer: str = _opt("sgd", "optimizer", choices=_fixed(OPTIMIZERS))
    trust_coefficient: float = _opt(0.001, "LARS trust coefficient", check=non_negative)
    algorithm: str = _opt("auto", "all-reduce algorithm",
                          choices=_owned("mpisgd.comm.communicator", "ALGORITHM_NAMES"))
    # DistBelief model parallelism (mpisgd.modelparallel): one replica over stages x splits of ranks
    # (read by sync and, split replicas on a parameter server, by downpour/dcasgd: GRADIENT_STRATEGIES)
    stages: int = _opt(1, "pipeline stages per model replica (1: no model parallelism)", check=positive,
                       used_by=GRADIENT_STRATEGIES)
    micro_batches: int = _opt(1, "micro-batches per step in the pipeline (at least --stages)", check=positive,
                              used_by=GRADIENT_STRATEGIES)
    pipeline_schedule: str = _opt("gpipe", "pipeline schedule: gpipe (all forward, then all backward) or 1f1b",
                                  choices=_owned("mpisgd.modelparallel.schedules", "SCHEDULES"),
                                  used_by=GRADIENT_STRATEGIES)
    balance: str = _opt("params", "how layers are cut into stages: params, time, uniform, or layers per "
                        "stage, e.g. 2,3", check=lambda v: _balance_problem(v), used_by=GRADIENT_STRATEGIES)
    tensor_parallel: int = _opt(1, "ranks each Linear of a stage is split over (by output features)",
                                check=positive, used_by=GRADIENT_STRATEGIES)


@dataclass(frozen=True)
class DownpourConfig(_Section):
    """Downpour SGD (Dean et al. 2012) and DC-ASGD (Zheng et al. 2017) on a sharded parameter server."""

    n_fetch: int = _opt(1, "pull parameters every N worker steps (Dean et al.: n_fetch)", check=positive)
    n_push: int = _opt(1, "push accumulated gradients every N worker steps (n_push)", check=positive)
    server_rule: str = _opt("adagrad", "downpour: update rule applied by the servers (dcasgd always uses sgd "
                            "on the compensated gradient)", choices=_owned("mpisgd.downpour.rules", "RULES"),
                            used_by=("downpour",))
    adagrad_eps: float = _opt(1e-8, "downpour: Adagrad epsilon", check=positive, used_by=("downpour",))
    dc_lambda: float = _opt(0.04, "dcasgd: delay-compensation strength lambda (Zheng et al.)",
                            check=non_negative, used_by=("dcasgd",))
    dc_variant: str = _opt("constant", "dcasgd: constant lambda, or adaptive (lambda / sqrt(mean square of g))",
                           choices=_owned("mpisgd.downpour.rules", "DC_VARIANTS"), used_by=("dcasgd",))
    dc_momentum: float = _opt(0.95, "dcasgd adaptive: decay of the mean square of the gradient",
                              check=non_negative, used_by=("dcasgd",))
    warmstart_steps: int = _opt(0, "steps one replica trains alone before the others join", check=non_negative)
    server_nice: int = _opt(0, "lower the servers' CPU priority by this niceness (0-19) so that workers "
                            "sharing their cores get them first (see README)", check=niceness)
    eval_every: int = _opt(0, "evaluate on the validation set every N pushes (0: once per epoch of data)",
                           check=non_negative)
    max_staleness: Optional[int] = _opt(None, "bounded staleness (SSP, Ho et al. 2013): no worker starts step "
                                        "t+s+1 before every live worker has finished step t; 0 is bulk-"
                                        "synchronous (default: fully asynchronous)", check=non_negative_or_none,
                                        used_by=("downpour", "dcasgd"))


@dataclass(frozen=True)
class SandblasterConfig(_Section):
    """Sandblaster L-BFGS (Dean et al. 2012)."""

    history: int = _opt(10, "L-BFGS history size m", check=positive)
    portion_size: int = _opt(64, "samples per work portion handed to a free worker", check=positive)
    max_iterations: int = _opt(100, "maximum L-BFGS iterations", check=positive)
    gradient_tolerance: float = _opt(1e-5, "stop when the gradient's max-norm falls below this", check=positive)
    backup_tasks: bool = _opt(True, "re-issue unfinished portions near the end of a pass")


@dataclass(frozen=True)
class SyncPSConfig(_Section):
    """Synchronous SGD on the parameter server with backup workers (Chen et al. 2016)."""

    backup_workers: int = _opt(0, "sync-ps: each step applies the first N-b of the N workers' gradients and "
                               "discards the rest (b backup workers)", check=non_negative)


#: section attribute of TrainConfig -> (its dataclass, the title of its group in `mpisgd train --help`)
SECTIONS: dict[str, tuple[type, str]] = {
    "common": (CommonConfig, "common options"),
    "sync": (SyncConfig, "sync options (Goyal et al. 2017)"),
    "downpour": (DownpourConfig, "downpour/dcasgd options (Dean et al. 2012; Zheng et al. 2017)"),
    "sandblaster": (SandblasterConfig, "sandblaster options (Dean et al. 2012)"),
    "syncps": (SyncPSConfig, "sync-ps options (Chen et al. 2016)"),
}


@dataclass(frozen=True)
class Setting:
    """One setting: where it lives and which strategies read it."""

    name: str
    section: str
    field: Field
    used_by: tuple


def _settings() -> dict[str, Setting]:
    table = {}
    for section, (cls, _) in SECTIONS.items():
        for f in fields(cls):
            used_by = f.metadata.get("used_by") or (tuple(STRATEGIES) if section == "common"
                                                     else strategies_reading(section))
            table[f.name] = Setting(f.name, section, f, used_by)
    return table


#: every setting by its flat name (the flag without dashes, the config-file key)
SETTINGS: dict[str, Setting] = _settings()


@dataclass(frozen=True)
class TrainConfig:
    """Everything `mpisgd train` needs; every rank builds the same one from the same argv.

    Build it from flat names with :meth:`from_settings`; read any setting as ``cfg.<name>``.
    """

    common: CommonConfig = field(default_factory=CommonConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    downpour: DownpourConfig = field(default_factory=DownpourConfig)
    sandblaster: SandblasterConfig = field(default_factory=SandblasterConfig)
    syncps: SyncPSConfig = field(default_factory=SyncPSConfig)

    def __post_init__(self) -> None:
        if self.common.resume in (True, "auto") and not self.common.checkpoint_dir:
            raise ConfigError("--resume needs --checkpoint-dir (or the path of a checkpoint file)")

    def __getattr__(self, name: str) -> Any:
        """``cfg.batch_size`` reads ``cfg.common.batch_size``: the flat names of the settings, read-only."""
        setting = SETTINGS.get(name)
        if setting is None:
            raise AttributeError(f"{type(self).__name__!r} has no setting {name!r}")
        return getattr(getattr(self, setting.section), name)

    @property
    def strategy(self) -> str:
        return self.common.strategy

    @classmethod
    def from_settings(cls, values: Mapping[str, Any], *, given: Optional[Mapping[str, str]] = None) -> TrainConfig:
        """A config from flat names (already converted), the rest at their defaults.

        Args:
            values: setting name -> value.
            given: setting name -> where it was given ("--flag", a file name) for the settings set on
                purpose; each must be read by the chosen strategy. Default: every key of ``values``.
        Raises:
            ConfigError: an unknown name, an invalid value, or a setting the strategy ignores.
        """
        unknown = [name for name in values if name not in SETTINGS]
        if unknown:
            raise ConfigError(f"unknown setting {unknown[0]!r}; valid: {', '.join(SETTINGS)}")
        by_section: dict[str, dict] = {name: {} for name in SECTIONS}
        for name, value in values.items():
            by_section[SETTINGS[name].section][name] = value
        common = CommonConfig(**by_section["common"])
        _refuse_ignored(common.strategy, given if given is not None else {name: flag(name) for name in values})
        return cls(common=common, **{name: SECTIONS[name][0](**by_section[name]) for name in SECTIONS
                                     if name != "common"})

    def with_settings(self, **values: Any) -> TrainConfig:
        """A copy with some settings changed, by flat name (like `dataclasses.replace`)."""
        by_section: dict[str, dict] = {}
        for name, value in values.items():
            if name not in SETTINGS:
                raise ConfigError(f"unknown setting {name!r}")
            by_section.setdefault(SETTINGS[name].section, {})[name] = value
        return replace(self, **{name: replace(getattr(self, name), **changes)
                                for name, changes in by_section.items()})


def _refuse_ignored(strategy: str, given: Mapping[str, str]) -> None:
    for name, source in given.items():
        users = SETTINGS[name].used_by
        if strategy not in users:
            where = "" if source == flag(name) else f" (set in {source})"
            raise ConfigError(f"{flag(name)}{where} is not used by --strategy {strategy}; "
                              f"it is read by --strategy {', '.join(users)} only")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _convert(f: Field, value: Any) -> Any:
    """A value from a flag or a config file, to the field's type."""
    if value is None:  # a config file's null: only where None is the default ("not set")
        if f.default is None:
            return None
        raise ConfigError(f"{flag(f.name)}: needs a value, got null")
    kind = f.metadata.get("kind")
    default = f.default if f.default is not MISSING else None
    annotation = str(f.type)
    try:
        if kind is not None:
            return kind(",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else value)
        if isinstance(default, bool) or annotation == "bool":
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if ("int" in annotation or "float" in annotation) and isinstance(value, bool):
            raise ValueError(value)  # a config file's true is no number
        if "int" in annotation:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if "float" in annotation:
            return float(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{flag(f.name)}: cannot read {value!r} as {annotation}") from None
    return str(value)


def add_train_arguments(parser: Any) -> None:
    """One flag per setting, in one argument group per section (default None = 'not given', so file
    values can apply)."""
    parser.add_argument("--config", help="TOML or JSON file of settings (keys are the flag names)")
    groups = {name: parser.add_argument_group(title) for name, (_, title) in SECTIONS.items()}
    for setting in SETTINGS.values():
        f, group = setting.field, groups[setting.section]
        help_text = f.metadata.get("help", "")
        if setting.section == "common" and setting.used_by != tuple(STRATEGIES):
            help_text = f"{'/'.join(setting.used_by)}: {help_text}"
        default = f.default if f.default is not MISSING else None
        if f.metadata.get("const") is not None:  # a flag with an optional value: --resume [auto|PATH]
            group.add_argument(flag(f.name), dest=f.name, nargs="?", const=f.metadata["const"], default=None,
                               metavar=f.name.upper(), help=f"{help_text} (default {default})")
        elif isinstance(default, bool):
            group.add_argument(flag(f.name), dest=f.name, action="store_true", default=None,
                               help=f"{help_text} (default {default})")
            if default:
                group.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false")
        else:
            group.add_argument(flag(f.name), dest=f.name, default=None, metavar=f.name.upper(),
                               help=f"{help_text} (default {default})")


def read_config_file(path: str) -> dict:
    """Settings from a TOML (.toml) or JSON file; keys may use dashes or underscores."""
    file = Path(path)
    try:
        text = file.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        if file.suffix == ".toml":
            import tomllib
            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except ImportError:
        raise ConfigError("TOML config files need Python >= 3.11; use JSON") from None
    except ValueError as exc:
        raise ConfigError(f"cannot parse config file {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a table of settings")
    return {key.replace("-", "_"): value for key, value in data.items()}


def train_config_from(args: Any) -> TrainConfig:
    """Defaults < config file < flags, converted and validated."""
    values: dict = {}
    given: dict = {}
    if getattr(args, "config", None):
        for key, value in read_config_file(args.config).items():
            if key not in SETTINGS:
                raise ConfigError(f"unknown setting {key!r} in {args.config}; valid: {', '.join(SETTINGS)}")
            values[key] = _convert(SETTINGS[key].field, value)
            given[key] = args.config
    for name, setting in SETTINGS.items():
        value = getattr(args, name, None)
        if value is not None:
            values[name] = _convert(setting.field, value)
            given[name] = flag(name)
    return TrainConfig.from_settings(values, given=given)

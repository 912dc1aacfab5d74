"""Training configuration: one frozen dataclass, validated on construction.

The `mpisgd train` flags are generated from the fields below (name -> --name-with-dashes, help
from the field's metadata), so a setting is declared once. Precedence: defaults < config file
(TOML or JSON, keys are field names) < command-line flags. Unknown keys are errors naming the key.
"""

from __future__ import annotations

import json
import math
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Optional

from mpisgd.errors import ConfigError

STRATEGIES = ("sync", "downpour", "dcasgd", "sandblaster")
SERVER_RULES = ("sgd", "adagrad")
DC_VARIANTS = ("constant", "adaptive")
MODELS = ("linear", "mlp", "cnn")
OPTIMIZERS = ("sgd", "lars")
SCHEDULES = ("constant", "step", "cosine")
ON_NONFINITE = ("stop", "skip")
DEVICES = ("cpu", "cuda")


def _opt(default: Any, help: str, *, choices: Optional[tuple] = None, kind: Any = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices, "kind": kind})


def _ints(text: str) -> tuple:
    return tuple(int(v) for v in str(text).split(",") if v.strip())


def _floats(text: str) -> tuple:
    return tuple(float(v) for v in str(text).split(",") if v.strip())


@dataclass(frozen=True)
class TrainConfig:
    """Everything `mpisgd train` needs; every rank builds the same one from the same argv."""

    strategy: str = _opt("sync", "training strategy", choices=STRATEGIES)
    model: str = _opt("mlp", "built-in model", choices=MODELS)
    hidden: tuple = _opt((256, 128), "hidden layer widths of mlp, e.g. 256,128", kind=_ints)
    data: Optional[str] = _opt(None, "training HDF5 file with datasets x and y (default: the built-in "
                               "'mpisgd-shapes' set, generated offline on first use)")
    val: Optional[str] = _opt(None, "validation HDF5 file of the same shape (default: the built-in set's)")
    epochs: int = _opt(5, "epochs to train")
    max_steps: Optional[int] = _opt(None, "stop after this many optimizer steps in total (counts across --resume; "
                                    "per worker in downpour/dcasgd)")
    batch_size: int = _opt(32, "per-rank batch size (global batch = ranks x this)")
    lr: float = _opt(0.1, "base learning rate for --reference-batch; scaled linearly to the global batch")
    reference_batch: int = _opt(256, "batch size at which --lr applies (Goyal et al.: 256)")
    warmup_epochs: float = _opt(0.0, "gradual warm-up length in epochs (Goyal et al.: 5)")
    warmup_start_factor: Optional[float] = _opt(None, "first warm-up lr as a fraction of the target "
                                                "(default 1/k for a k-times larger batch)")
    schedule: str = _opt("constant", "learning-rate decay after warm-up", choices=SCHEDULES)
    milestones: tuple = _opt((), "epochs where the step schedule multiplies the lr by --gamma, e.g. 30,60",
                             kind=_floats)
    gamma: float = _opt(0.1, "step schedule decay factor")
    momentum: float = _opt(0.9, "momentum")
    weight_decay: float = _opt(1e-4, "weight decay (L2)")
    no_decay_bias_bn: bool = _opt(False, "no weight decay (and no LARS trust ratio) on biases and norm layers")
    optimizer: str = _opt("sgd", "optimizer", choices=OPTIMIZERS)
    trust_coefficient: float = _opt(0.001, "LARS trust coefficient")
    seed: int = _opt(0, "seed for initialization and shuffling (the same on every rank)")
    algorithm: str = _opt("auto", "all-reduce algorithm", choices=("auto", "rhd", "ring", "shm", "native"))
    checkpoint_dir: Optional[str] = _opt(None, "directory for checkpoints (written atomically by rank 0)")
    checkpoint_every: int = _opt(0, "also checkpoint every N steps (0: only at the end of each epoch)")
    resume: bool = _opt(False, "continue from the latest checkpoint in --checkpoint-dir")
    metrics: Optional[str] = _opt(None, "JSONL metrics file (written by rank 0)")
    log_every: int = _opt(10, "log training loss every N steps")
    target_accuracy: Optional[float] = _opt(None, "stop once validation accuracy reaches this (0..1]")
    on_nonfinite: str = _opt("stop", "on a NaN/Inf gradient: stop with an error, or skip the step",
                             choices=ON_NONFINITE)
    device: str = _opt("cpu", "cpu, or cuda (one GPU per node-local rank)", choices=DEVICES)
    share_gpus: bool = _opt(False, "allow more ranks per node than GPUs with --device cuda")
    progress: bool = _opt(True, "progress bar on rank 0 (when stderr is a terminal)")
    # --- parameter-server strategies (downpour, dcasgd, sandblaster) ---
    servers: int = _opt(1, "downpour/dcasgd/sandblaster: number of parameter-server shard ranks")
    n_fetch: int = _opt(1, "downpour: pull parameters every N worker steps (Dean et al.: n_fetch)")
    n_push: int = _opt(1, "downpour: push accumulated gradients every N worker steps (n_push)")
    server_rule: str = _opt("adagrad", "downpour: update rule applied by the servers (dcasgd always uses sgd "
                            "on the compensated gradient)", choices=SERVER_RULES)
    adagrad_eps: float = _opt(1e-8, "downpour: Adagrad epsilon")
    dc_lambda: float = _opt(0.04, "dcasgd: delay-compensation strength lambda (Zheng et al.)")
    dc_variant: str = _opt("constant", "dcasgd: constant lambda, or adaptive (lambda / sqrt(mean square of g))",
                           choices=DC_VARIANTS)
    dc_momentum: float = _opt(0.95, "dcasgd adaptive: decay of the mean square of the gradient")
    warmstart_steps: int = _opt(0, "downpour: steps one replica trains alone before the others join")
    server_nice: int = _opt(0, "downpour: lower the servers' CPU priority by this niceness (0-19) so that "
                            "workers sharing their cores get them first (see README)")
    worker_timeout: float = _opt(30.0, "downpour/sandblaster: seconds without a heartbeat before a worker "
                                 "counts as dead")
    eval_every: int = _opt(0, "downpour: evaluate on the validation set every N pushes (0: once per epoch of data)")
    history: int = _opt(10, "sandblaster: L-BFGS history size m")
    portion_size: int = _opt(64, "sandblaster: samples per work portion handed to a free worker")
    max_iterations: int = _opt(100, "sandblaster: maximum L-BFGS iterations")
    gradient_tolerance: float = _opt(1e-5, "sandblaster: stop when the gradient's max-norm falls below this")
    backup_tasks: bool = _opt(True, "sandblaster: re-issue unfinished portions near the end of a pass")

    def __post_init__(self) -> None:
        for f in fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise ConfigError(f"{_flag(f.name)} must be one of {', '.join(choices)}, got {value!r}")
        positive = ("epochs", "batch_size", "lr", "reference_batch", "log_every", "servers", "n_fetch", "n_push",
                    "adagrad_eps", "worker_timeout", "history", "portion_size", "max_iterations",
                    "gradient_tolerance")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"{_flag(name)} must be positive, got {getattr(self, name)}")
        non_negative = ("warmup_epochs", "momentum", "weight_decay", "trust_coefficient", "seed",
                        "checkpoint_every", "gamma", "dc_lambda", "dc_momentum", "warmstart_steps", "eval_every")
        for name in non_negative:
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ConfigError(f"{_flag(name)} must be >= 0, got {value}")
        if not 0 <= self.server_nice <= 19:
            raise ConfigError(f"--server-nice must be in 0..19, got {self.server_nice}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ConfigError(f"--max-steps must be positive, got {self.max_steps}")
        if not self.hidden or min(self.hidden) <= 0:
            raise ConfigError(f"--hidden must list positive widths, got {self.hidden}")
        if self.target_accuracy is not None and not 0 < self.target_accuracy <= 1:
            raise ConfigError(f"--target-accuracy must be in (0, 1], got {self.target_accuracy}")
        if self.warmup_start_factor is not None and not 0 < self.warmup_start_factor <= 1:
            raise ConfigError(f"--warmup-start-factor must be in (0, 1], got {self.warmup_start_factor}")
        if self.resume and not self.checkpoint_dir:
            raise ConfigError("--resume needs --checkpoint-dir")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _convert(f, value: Any) -> Any:
    """A value from a flag or a config file, to the field's type."""
    if value is None:
        return None
    kind = f.metadata.get("kind")
    if kind is not None:
        return kind(",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else value)
    default = f.default if f.default is not MISSING else None
    annotation = str(f.type)
    try:
        if isinstance(default, bool) or annotation == "bool":
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if "int" in annotation:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if "float" in annotation:
            return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{_flag(f.name)}: cannot read {value!r} as {annotation}") from None
    return str(value)


def add_train_arguments(parser) -> None:
    """One flag per TrainConfig field (default None = 'not given', so file values can apply)."""
    parser.add_argument("--config", help="TOML or JSON file of settings (keys are the flag names)")
    for f in fields(TrainConfig):
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not MISSING else None
        if isinstance(default, bool):
            parser.add_argument(_flag(f.name), dest=f.name, action="store_true", default=None,
                                help=f"{help_text} (default {default})")
            if default:
                parser.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false")
        else:
            parser.add_argument(_flag(f.name), dest=f.name, default=None, metavar=f.name.upper(),
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


def train_config_from(args) -> TrainConfig:
    """Defaults < config file < flags, converted and validated."""
    by_name = {f.name: f for f in fields(TrainConfig)}
    values: dict = {}
    if getattr(args, "config", None):
        for key, value in read_config_file(args.config).items():
            if key not in by_name:
                raise ConfigError(f"unknown setting {key!r} in {args.config}; valid: {', '.join(by_name)}")
            values[key] = _convert(by_name[key], value)
    for name, f in by_name.items():
        given = getattr(args, name, None)
        if given is not None:
            values[name] = _convert(f, given)
    return replace(TrainConfig(), **values) if values else TrainConfig()

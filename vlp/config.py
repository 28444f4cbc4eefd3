"""Typed run configuration: dataclass sections, a YAML file plus dotted ``key=value`` overrides.

Every run is described by one :class:`Config`; the resolved config is written into the run
directory so a run can be reproduced from it alone. Unknown keys are errors that name the key and
the closest valid one, because a typo that silently falls back to a default wastes a whole run.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration problem a user can fix (unknown key, bad value, missing file)."""


@dataclass
class ModelConfig:
    """Which model to build and how to initialise it."""

    name: str = "vlp-tiny-vit"
    """open_clip model name, path to a model-config JSON, ``local-dir:``/``hf-hub:`` name."""
    pretrained: str | None = None
    """open_clip pretrained tag or a local weights path (works offline with a path)."""
    image_pretrained: str | None = None
    """A local file of the image tower's own weights (e.g. timm's ImageNet ``resnet50`` state
    dict, safetensors or a weights-only torch file), loaded after the model is built.
    ``required``: a recipe that must not start from random weights says so at start-up."""
    lock_image: bool = False
    """Freeze the image tower (LiT)."""
    lock_text: bool = False
    """Freeze the text tower."""
    patch_dropout: float = 0.0
    """FLIP's patch dropout (Li et al. 2023), open_clip's ``vision_cfg.patch_dropout``: this
    fraction of a ViT's patch tokens is dropped at random after the patch embedding, in training
    only (evaluation sees every token), so a step costs about (1 - p) of the image tower's
    compute. Refused where the tower is not a ViT, and by PyramidCLIP (it pools regions from
    the whole token grid). 0 = off."""
    tokenizer: str | None = None
    """A local SentencePiece ``.model`` file instead of the model's own tokenizer, or a packaged
    one (``vlp:procedural-bpe``: the procedural captions, for a small captioning head)."""


@dataclass
class DataConfig:
    """The training stream."""

    train_shards: str = ""
    """Shard URLs: a folder, brace pattern or fsspec URL; several sources joined with ``::``."""
    train_weights: list[float] | None = None
    """One weight per ``::`` source (open_clip's upsampling factors); resampled mode only."""
    batch_size: int = 64
    """Samples per rank per micro-step."""
    workers: int = 2
    """DataLoader worker processes per rank."""
    prefetch_factor: int = 2
    """Batches each worker prepares ahead."""
    resampled: bool = True
    """Sample shards with replacement (an infinite stream); False = epochs over disjoint shards."""
    shuffle_buffer: int = 1000
    """Seeded sample shuffle buffer size (per canonical stream)."""
    streams: int = 0
    """Canonical streams: the sample sequence is a function of the data, seed, global batch,
    batch_size and this, not of processes, accumulation or workers, so a resume may change
    those (README, "Resume on another number of GPUs"). A multiple of processes x
    train.accum_steps; 0: processes x accum_steps x workers of the run's first start."""
    shards_in_flight: int = 8
    """Shards each worker keeps open and takes samples from in turn, so that a batch mixes
    shards even when each shard holds one class; costs one read buffer per open shard."""
    image_keys: list[str] = field(default_factory=lambda: ["jpg", "jpeg", "png", "webp"])
    """Sample members tried, in order, for the image."""
    text_key: str = "txt"
    """Sample member holding the caption."""
    caption_field: str | None = None
    """Take the caption from this field of the sample's ``json`` instead of ``text_key``."""
    max_skip_fraction: float = 0.1
    """Stop the run when more than this fraction of samples was skipped as bad data."""
    batch_timeout: float = 600.0
    """Seconds to wait for one batch before the run stops with an error (never hang)."""
    remote_timeout: float = 60.0
    """Seconds one read of a remote shard may take before it is retried."""
    remote_retries: int = 3
    """Re-opens of a stalled remote shard before the run stops with an error."""
    uint8_batches: str = "auto"
    """How images travel from the data workers: ``true``: as uint8 pixels (4x fewer bytes through
    the workers' queue and the host-to-device copy), made float and normalised with the model's
    mean/std once on the device; ``false``: normalised float32 from the workers (open_clip's
    way); ``auto``: ``true`` on CUDA. Either way the same images to the bit, and on CUDA the
    DataLoader pins the batches' memory, so that the copy runs asynchronously. ``true`` is
    refused where the model's preprocessing has no uint8 path."""


@dataclass
class ObjectiveConfig:
    """The training objective, by registry name, and its typed section.

    In YAML: ``objective: {name: convirt, convirt: {lam: 0.75}}``; on the command line
    ``objective.convirt.lam=0.75``. Each objective declares its section as a dataclass
    (``Objective.Config``); keys are checked against it at load, and the resolved section of the
    chosen objective is written into ``config.yaml``.
    """

    name: str = "clip"
    """The objective, by registry name (``vlp config --list`` lists them and their keys)."""
    settings: dict[str, Any] = field(default_factory=dict)
    """Objective name -> its ``Config`` dataclass instance (those given, plus the chosen one)."""

    def section(self) -> Any:
        """The chosen objective's resolved settings (its ``Config`` with defaults filled in)."""
        if self.name not in self.settings:
            self.settings[self.name] = _objective_config_class(self.name, "objective.name")()
        return self.settings[self.name]

    def to_dict(self) -> dict[str, Any]:
        """``{"name": ..., "<name>": {...}}`` for every section given and the chosen one."""
        self.section()
        return {"name": self.name} | {
            name: dataclasses.asdict(value) for name, value in self.settings.items()
        }


def _objective_config_class(name: str, key: str) -> type:
    """The ``Config`` dataclass of the objective registered as ``name`` (a ConfigError naming
    ``key`` and the closest registered name otherwise)."""
    from vlp.objectives.registry import objective_class

    try:
        return objective_class(name).Config
    except ValueError as error:
        raise ConfigError(f"config key '{key}': {error}") from None


OPTIMIZERS = ("adamw", "stable_adamw", "adamw8bit", "stable_adamw8bit")
"""The values of ``optim.name`` (built by :func:`vlp.training.optim.create_optimizer`)."""
FUSED = ("auto", "true", "false")
"""The values of ``optim.fused``."""
UINT8_BATCHES = ("auto", "true", "false")
"""The values of ``data.uint8_batches``."""


@dataclass
class OptimConfig:
    """The optimizer (AdamW or a variant, :mod:`vlp.training.optim`) with linear warmup and
    cosine decay."""

    name: str = "adamw"
    """``adamw`` (torch's AdamW, fp32 moments); ``stable_adamw`` (AdamW with update clipping,
    Wortsman et al. 2023: each tensor's lr is divided by max(1, RMS(g²/v̂)), against loss spikes;
    the paper drops gradient clipping with it: ``grad_clip: null``); ``adamw8bit`` (bitsandbytes'
    AdamW with block-wise quantised 8-bit moments, Dettmers et al. 2022: 2 bytes of state per
    parameter instead of 8); ``stable_adamw8bit`` (both). With 8 bits, the undecayed parameters
    (scalars, biases, norms, logit scale/bias) and tensors under 4,096 elements keep fp32 moments."""
    lr: float = 5e-4
    """Peak learning rate, reached after ``warmup_steps`` and decayed to 0 by ``train.steps``."""
    weight_decay: float = 0.2
    """AdamW's decoupled weight decay, on weight matrices only (not gains, biases, the scale)."""
    beta1: float = 0.9
    """AdamW's first-moment decay."""
    beta2: float = 0.98
    """AdamW's second-moment decay (CLIP's 0.98 rather than 0.999)."""
    eps: float = 1e-6
    """AdamW's denominator epsilon."""
    warmup_steps: int = 100
    """Steps of linear warmup from 0 to ``lr``."""
    grad_clip: float | None = 1.0
    """Clip the global gradient norm to this value; None disables clipping."""
    fused: str = "auto"
    """torch's fused AdamW kernel (one launch for every tensor's update instead of one per
    tensor group): ``auto`` uses it on CUDA with ``optim.name=adamw``; ``true`` everywhere torch
    has it (CUDA, and the CPU); ``false`` never. Same update within float rounding."""


@dataclass
class TrainConfig:
    """The loop: length, output, checkpoints, resume."""

    steps: int = 1000
    """Optimizer steps."""
    out_dir: str = "runs/default"
    """The run folder: checkpoints, config.yaml, metrics.jsonl, train.log, plots, eval results."""
    seed: int = 0
    """Seed of the initial weights, the data order and the augmentations."""
    accum_steps: int = 1
    """Micro-batches of ``data.batch_size`` per optimizer step, accumulated exactly (GradCache):
    the contrastive loss sees all k·b samples of every rank, as one k times larger batch."""
    group_size: int | None = None
    """Ranks per contrastive group (M2-Encoder grouped aggregation); None = all ranks, the exact
    full-batch loss. Smaller groups keep features inside a group (e.g. a node)."""
    tile_size: int | None = None
    """Rows/columns per tile of the tiled contrastive core (None = 1024)."""
    checkpoint_every: int = 500
    """Steps between checkpoints (one is also written at the end and on SIGTERM/Ctrl-C)."""
    keep_checkpoints: int = 2
    """Newest checkpoints kept; older ones are deleted once a newer one is complete."""
    resume: str | None = None
    """``latest`` or a checkpoint directory. Without it, a folder that already holds checkpoints
    is refused (see ``overwrite``)."""
    elastic: str = "keep"
    """A resume whose global batch (data.batch_size x accum_steps x processes) differs from the
    checkpoint's: ``keep`` refuses it (another number of processes keeps the global batch by
    setting accum_steps); ``rescale_lr`` continues with optim.lr x new / old global batch (the
    linear scaling rule) and a resampled stream drawn afresh from (seed, step)."""
    overwrite: bool = False
    """Start afresh in a ``out_dir`` that holds a run: its checkpoints, metrics, results and plots
    are removed first. Off by default, so a new run never clobbers a finished one."""
    log_every: int = 10
    """Steps between rows of ``metrics.jsonl`` and the trackers."""
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Accelerate trackers (``tensorboard``, ``wandb``, ...; [] for none). wandb needs the
    ``wandb`` package and its login, or ``WANDB_MODE=offline``."""
    max_nonfinite_steps: int = 5
    """Consecutive NaN/inf losses tolerated (each skipped) before the run stops."""
    compile: bool = False
    """``torch.compile`` the open_clip towers in place (``nn.Module.compile``: parameter and
    checkpoint names unchanged), so that their kernels are fused; the first steps and every new
    batch shape pay the compilation (a minute for a ViT-B on a GPU)."""
    compile_backend: str = "inductor"
    """torch.compile's backend for ``train.compile``; ``eager`` or ``aot_eager`` compile fast
    (graph capture only), for checks."""
    threads: int = 0
    """torch intra-op threads per process; 0 = OMP_NUM_THREADS if set, else the physical cores
    this process may use, less those other programs keep busy at start, shared by the training
    processes of the node (data workers are not subtracted: ``vlp/training/threads.py``)."""


@dataclass
class EvalConfig:
    """Evaluations run during and after training."""

    every: int = 0
    """Run the evaluators every N steps (0: only at the end)."""
    zeroshot_shards: str | None = None
    """Held-out shards with a ``cls`` field for zero-shot classification and retrieval."""
    classnames: list[str] = field(default_factory=list)
    """Names of ``zeroshot_shards``' classes, item i naming ``cls`` i (needed with them)."""
    templates: list[str] = field(default_factory=lambda: ["a photo of a {c}."])
    """Zero-shot prompts, ``{c}`` standing for the class name; the classifier averages them."""
    batch_size: int = 256
    """Images per forward pass of the evaluators."""
    datasets: dict[str, str] = field(default_factory=dict)
    """More eval sets, name -> path: a CLIP_benchmark webdataset root, a folder of class
    subfolders or a CSV table (as ``vlp eval`` reads them); logged as ``eval/<name>/<metric>``."""


@dataclass
class Config:
    """A whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        """The config as plain nested dicts (what ``config.yaml`` holds)."""
        return {
            f.name: getattr(self, f.name).to_dict()
            if f.name == "objective"
            else dataclasses.asdict(getattr(self, f.name))
            for f in dataclasses.fields(self)
        }

    def save(self, path: str | Path) -> None:
        """Write the resolved config as YAML."""
        Path(path).write_text(yaml.safe_dump(_redacted(self.to_dict()), sort_keys=False))


def _closest(name: str, options: list[str]) -> str:
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.0)
    return f"; did you mean '{match[0]}'?" if match else ""


_SECRET_QUERY = re.compile(
    r"([?&](?:token|access_token|key|secret|password|sig|signature|x-amz-[a-z-]+)=)[^&#\s]*",
    re.IGNORECASE,
)
_USERINFO = re.compile(r"(\w+://)[^/@\s]+@")


def redact_url(text: str) -> str:
    """``text`` with URL credentials masked: ``user:pass@`` and secret query parameters
    (``token``, ``key``, ``sig``, ``X-Amz-*``, ...) become ``***``. For what is logged or written
    (config.yaml); a run needing credentials takes them from the environment or fsspec config."""
    return _SECRET_QUERY.sub(r"\1***", _USERINFO.sub(r"\1***@", text))


def _redacted(value: Any) -> Any:
    if isinstance(value, str):
        return redact_url(value)
    if isinstance(value, dict):
        return {k: _redacted(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redacted(v) for v in value]
    return value


def _yaml_problem(error: yaml.YAMLError) -> str:
    """The problem and its line:column, without PyYAML's multi-line ``<unicode string>`` dump."""
    if isinstance(error, yaml.MarkedYAMLError) and error.problem_mark is not None:
        mark = error.problem_mark
        return f"{error.problem} at line {mark.line + 1}, column {mark.column + 1}"
    return str(error).replace("\n", " ")


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the field's declared type, or say which key is wrong."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, args[0], key)
    if origin in (list, dict):
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, origin):
            raise ConfigError(
                f"config key '{key}' needs {_article(origin.__name__)} {origin.__name__}, "
                f"got {value!r}"
            )
        return value
    if hint is bool:
        if isinstance(value, str):
            if value.lower() in ("true", "1", "yes"):
                return True
            if value.lower() in ("false", "0", "no"):
                return False
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' needs true/false, got {value!r}")
    if hint in (int, float, str):
        try:
            return hint(value)
        except (TypeError, ValueError):
            raise ConfigError(
                f"config key '{key}' needs {_article(hint.__name__)} {hint.__name__}, got {value!r}"
            ) from None
    return value


def _apply_objective(section: ObjectiveConfig, updates: dict[str, Any]) -> None:
    """``name`` plus one mapping per objective name, each applied to that objective's Config."""
    if "name" in updates:
        section.name = _coerce(updates["name"], str, "objective.name")
        _objective_config_class(section.name, "objective.name")
    for name, value in updates.items():
        if name == "name":
            continue
        key = f"objective.{name}"
        config_class = _objective_config_class(name, key)
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' is a section; give it a mapping")
        current = section.settings.setdefault(name, config_class())
        _apply(current, value, key + ".")


def _apply(section: Any, updates: dict[str, Any], prefix: str) -> None:
    if isinstance(section, ObjectiveConfig):
        _apply_objective(section, updates)
        return
    types_ = _field_types(type(section))
    for name, value in updates.items():
        key = f"{prefix}{name}"
        if name not in types_:
            raise ConfigError(
                f"unknown config key '{key}'{_closest(name, list(types_))} "
                f"(valid keys in '{prefix.rstrip('.') or 'config'}': {', '.join(types_)})"
            )
        current = getattr(section, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{key}' is a section; give it a mapping")
            _apply(current, value, key + ".")
        else:
            setattr(section, name, _coerce(value, types_[name], key))


def _parse_override(item: str) -> dict[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form section.key=value")
    dotted, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as error:
        raise ConfigError(f"override '{item}' is not valid YAML: {_yaml_problem(error)}") from None
    nested: dict[str, Any] = {}
    node = nested
    parts = dotted.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return nested


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> Config:
    """Build a :class:`Config` from an optional YAML file and ``section.key=value`` overrides."""
    config = Config()
    layers: list[dict[str, Any]] = []
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"config file '{file}' does not exist")
        try:
            data = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(
                f"config file '{file}' is not valid YAML: {_yaml_problem(error)}"
            ) from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file '{file}' must hold a mapping of sections")
        layers.append(data)
    layers += [_parse_override(item) for item in overrides]
    # The objective sections last: reading them imports the objectives (torch, seconds), so
    # that a mistake anywhere else is reported at once.
    for layer in layers:
        _apply(config, {k: v for k, v in layer.items() if k != "objective"}, "")
    for layer in layers:
        if "objective" in layer:
            _apply(config, {"objective": layer["objective"]}, "")
    validate_config(config)
    return config


def validate_config(config: Config) -> None:
    """Reject values that cannot run, with the key that holds them."""
    checks = [
        (config.data.batch_size > 0, "data.batch_size must be > 0"),
        (config.data.workers >= 0, "data.workers must be >= 0"),
        (config.data.streams >= 0, "data.streams must be >= 0"),
        (config.data.prefetch_factor >= 1, "data.prefetch_factor must be >= 1"),
        (config.data.shards_in_flight >= 1, "data.shards_in_flight must be >= 1"),
        (0 <= config.data.max_skip_fraction <= 1, "data.max_skip_fraction must be in [0, 1]"),
        (config.data.batch_timeout > 0, "data.batch_timeout must be > 0"),
        (config.data.remote_timeout > 0, "data.remote_timeout must be > 0"),
        (config.data.remote_retries >= 0, "data.remote_retries must be >= 0"),
        (
            str(config.data.uint8_batches).lower() in UINT8_BATCHES,
            f"data.uint8_batches must be one of {', '.join(UINT8_BATCHES)}, got "
            f"{config.data.uint8_batches!r}",
        ),
        (config.train.steps > 0, "train.steps must be > 0"),
        (config.train.accum_steps >= 1, "train.accum_steps must be >= 1"),
        (
            config.train.elastic in ("keep", "rescale_lr"),
            f"train.elastic must be keep or rescale_lr, got {config.train.elastic!r}",
        ),
        (config.train.threads >= 0, "train.threads must be >= 0 (0 = automatic)"),
        (
            config.train.group_size is None or config.train.group_size >= 1,
            "train.group_size must be >= 1 (or null for all ranks)",
        ),
        (
            config.train.tile_size is None or config.train.tile_size >= 1,
            "train.tile_size must be >= 1 (or null for the default)",
        ),
        (config.train.checkpoint_every >= 0, "train.checkpoint_every must be >= 0"),
        (config.train.keep_checkpoints >= 1, "train.keep_checkpoints must be >= 1"),
        (config.optim.lr > 0, "optim.lr must be > 0"),
        (
            config.optim.name in OPTIMIZERS,
            f"optim.name must be one of {', '.join(OPTIMIZERS)}, got {config.optim.name!r}",
        ),
        (config.optim.warmup_steps >= 0, "optim.warmup_steps must be >= 0"),
        (
            str(config.optim.fused).lower() in FUSED,
            f"optim.fused must be one of {', '.join(FUSED)}, got {config.optim.fused!r}",
        ),
        (
            str(config.optim.fused).lower() != "true" or config.optim.name == "adamw",
            f"optim.fused=true needs optim.name=adamw (torch's AdamW); {config.optim.name} has "
            "no fused kernel: set optim.fused=auto or false",
        ),
        (
            0 <= config.model.patch_dropout < 1,
            f"model.patch_dropout must be in [0, 1), got {config.model.patch_dropout}",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    _objective_config_class(config.objective.name, "objective.name")
    for name, settings in config.objective.settings.items():
        check = getattr(settings, "validate", None)
        if check is not None:
            try:
                check()
            except ValueError as error:
                raise ConfigError(f"objective.{name}: {error}") from None

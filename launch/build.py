"""Build a run's parts from its config: objective, model, batch fields, stream, evaluators.

This is where the three layers meet (vlp knows nothing of shards or eval sets, data_pipelines
and evals nothing of objectives): the objective's declared fields (views with augmentation
presets, text fields with tokenizers, JSON keys) become the stream's ``BatchFields``; the
``eval`` section becomes evaluators through one registry. Every problem a user can fix is a
:class:`StartupError` with one sentence naming the key, field or shard and what to do.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shlex
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from open_clip.tokenizer import HFTokenizer

from data_pipelines.augment import build_preset
from data_pipelines.batch_fields import (
    ArrayField,
    BatchFields,
    ImageView,
    JsonField,
    SidecarField,
    TextField,
)
from data_pipelines.fields import missing_batch_fields, sidecar_gaps
from data_pipelines.shards import split_sources
from data_pipelines.sidecar import SidecarFormatError, sidecar_metadata
from data_pipelines.stream import TrainStream, make_train_stream
from data_pipelines.stream_settings import StreamSettings
from data_pipelines.text_sources import FIRST_CLAUSE_PREFIX, caption_source
from data_pipelines.transforms import (
    FastTransforms,
    NormalizedTransform,
    fast_transforms_for_model,
)
from evals.dataset_evaluator import DatasetEvaluator
from evals.datasets import load_labelled_shards, open_eval_set
from evals.eval_set import EvalDataError
from evals.heldout import HeldoutEvaluator
from launch.caption_args import caption_source_args
from vlp.config import Config
from vlp.models import PretrainedError, create_model, model_config, preprocess_config
from vlp.models.image_weights import REQUIRED, load_image_weights
from vlp.objectives import Objective, create_objective, objective_class
from vlp.objectives.base import Fields, TextSpec
from vlp.objectives.prior.reference_lm import tokenizer_identity

logger = logging.getLogger("vlp")

Evaluator = Callable[..., dict[str, float]]
OPENCLIP_PRESET = "openclip"
"""The preset that reproduces open_clip's own train transform (the model's preprocess cfg)."""


class StartupError(RuntimeError):
    """A problem with the user's config or data found before training starts."""


def build_objective(config: Config) -> Objective:
    """The objective named by ``objective.name`` with its resolved ``objective.<name>`` section."""
    try:
        return create_objective(config.objective.name, config.objective.section())
    except (ValueError, TypeError) as error:
        raise StartupError(f"objective.{config.objective.name}: {error}") from None


def shard_urls(urls: str, what: str, weights: list[float] | None = None) -> list[str]:
    """Expanded shard URLs (``::`` sources), or a StartupError naming what is wrong."""
    try:
        return split_sources(urls, weights)[0]
    except FileNotFoundError as error:
        raise StartupError(f"{what} shards not found: {error}") from None
    except ValueError as error:
        raise StartupError(str(error)) from None


def build_model(config: Config) -> tuple[Any, Any, Any, Any, dict[str, Any]]:
    """The open_clip model, its transforms and tokenizer, and the metadata stored with
    checkpoints (model name and config, preprocessing, the objective and its settings)."""
    objective = objective_class(config.objective.name)
    try:
        model, preprocess_train, preprocess_val, tokenizer = create_model(
            config.model.name,
            config.model.pretrained,
            lock_image=config.model.lock_image,
            lock_text=config.model.lock_text,
            tokenizer=config.model.tokenizer,
            model_kwargs=objective.model_kwargs,
            patch_dropout=config.model.patch_dropout,
        )
    except PretrainedError as error:
        raise StartupError(f"model.pretrained='{config.model.pretrained}': {error}") from None
    except (ValueError, RuntimeError, FileNotFoundError) as error:
        raise StartupError(f"model.name='{config.model.name}': {error}") from None
    image_weights = config.model.image_pretrained
    if image_weights == REQUIRED:
        raise StartupError(
            f"model.image_pretrained: this recipe starts {config.model.name}'s image tower from "
            "pretrained weights (its paper does): set it to a local weights file, e.g. timm's "
            "ImageNet resnet50 saved once with safetensors.torch.save_file(timm.create_model("
            "'resnet50', pretrained=True).state_dict(), PATH), or to null to train from random "
            "weights"
        )
    if image_weights:
        try:
            logger.info(load_image_weights(model, image_weights))
        except PretrainedError as error:
            raise StartupError(str(error)) from None
    info = {
        "model_name": config.model.name,
        "model_cfg": model_config(config.model.name) | objective.model_kwargs,
        "preprocess_cfg": preprocess_config(model),
        "objective": {
            "name": config.objective.name,
            "settings": dataclasses.asdict(config.objective.section()),
        },
    }
    return model, preprocess_train, preprocess_val, tokenizer, info


def _fast_transforms(model: Any) -> tuple[FastTransforms | None, str | None]:
    """The model's fast uint8 transforms, or None and why its preprocessing has none."""
    try:
        return fast_transforms_for_model(model), None
    except ValueError as reason:
        return None, str(reason)


def uint8_choice(
    setting: str, device: torch.device | str, no_uint8_path: str | None = None
) -> tuple[bool, str]:
    """Whether the data workers send uint8 views, normalised once on the device, and why
    (``data.uint8_batches``). ``auto`` takes them on CUDA, where the 4x fewer bytes save worker
    IPC and host-to-device copy time; on the CPU there is no copy, and the workers, mostly idle,
    take the float pass off the trainer. ``no_uint8_path``: why the model's preprocessing has
    no uint8 transform (None: it has one).

    Raises:
        StartupError: ``true`` for a model without the uint8 path.
    """
    choice = str(setting).lower()
    if no_uint8_path is not None:
        if choice == "true":
            raise StartupError(
                "data.uint8_batches=true needs the fast uint8 transforms, which this model's "
                f"preprocessing does not allow ({no_uint8_path}): set data.uint8_batches=auto "
                "or false"
            )
        return False, f"the model's preprocessing has no uint8 path: {no_uint8_path}"
    if choice in ("true", "false"):
        return choice == "true", f"data.uint8_batches={choice}"
    kind = torch.device(device).type
    return kind == "cuda", f"data.uint8_batches=auto on {kind}"


@dataclass
class StreamParts:
    """What the stream and the trainer need from the objective's fields."""

    fields: BatchFields
    draft_size: int | None
    normalize: Callable[[torch.Tensor], torch.Tensor] | None
    """Applied on the device to every image view (uint8 -> normalised float); None when the
    workers send normalised floats (``data.uint8_batches``)."""
    pin_memory: bool = False
    """The stream pins its batches (the run's device is CUDA)."""


def batch_fields(
    config: Config,
    declared: Fields,
    model: Any,
    preprocess_train: Any,
    tokenizer: Any,
    device: torch.device | str = "cpu",
) -> StreamParts:
    """The stream's fields for what the objective declared, with the model's preprocessing.

    A text field whose source is ``txt`` reads the user's caption (``data.text_key`` or
    ``data.caption_field``). The ``openclip`` preset and the model tokenizer carry no name into
    the fingerprint, so a CLIP run's stream (and a saved position) is today's. Every view is
    uint8 or every view normalised float32 (:func:`uint8_choice` on ``device``): the same
    images either way, so the fingerprint does not depend on it.
    """
    fast, no_uint8_path = _fast_transforms(model)
    uint8, why = uint8_choice(config.data.uint8_batches, device, no_uint8_path)
    logger.info(
        "data workers send %s (%s)",
        "uint8 images, normalised on the device" if uint8 else "normalised float32 images", why,
    )  # fmt: skip
    size = preprocess_config(model)["size"]
    size = int(size[0] if isinstance(size, list | tuple) else size)
    views: list[ImageView] = []
    drafts: list[int | None] = []
    for name, preset in declared.views.items():
        if fast is None:
            if preset != OPENCLIP_PRESET:
                raise StartupError(
                    f"augmentation preset '{preset}' (view '{name}') needs the fast uint8 "
                    f"path, which model '{config.model.name}' does not allow"
                )
            views.append(ImageView(name, preprocess_train))
            drafts.append(None)
            continue
        if preset == OPENCLIP_PRESET:
            transform: Any = fast.train
        else:
            try:
                transform = build_preset(preset, size)
            except ValueError as error:
                raise StartupError(f"objective.{config.objective.name}: {error}") from None
        drafts.append(getattr(transform, "draft_size", None))
        if not uint8:
            transform = NormalizedTransform(transform, fast.mean, fast.std)
        views.append(ImageView(name, transform, preset="" if preset == OPENCLIP_PRESET else preset))
    texts = [_text_field(config, name, spec, tokenizer) for name, spec in declared.texts.items()]
    json = [JsonField(name, spec.source, spec.item) for name, spec in declared.json.items()]
    arrays = [ArrayField(name, member) for name, member in declared.arrays.items()]
    sidecars = [SidecarField(name, path) for name, path in declared.sidecars.items()]
    try:
        fields = BatchFields(
            views=tuple(views),
            texts=tuple(texts),
            json=tuple(json),
            arrays=tuple(arrays),
            sidecars=tuple(sidecars),
        )
    except ValueError as error:
        raise StartupError(f"objective '{config.objective.name}': {error}") from None
    draft = None if None in drafts else max(d for d in drafts if d is not None)
    normalize = fast.normalize if fast is not None and uint8 else None
    return StreamParts(fields, draft, normalize, pin_memory=torch.device(device).type == "cuda")


def _caption_source(config: Config, source: str) -> str:
    """``txt`` (also inside ``first_clause:txt``) is the user's caption: ``data.text_key`` or
    ``json:<data.caption_field>``; other sources are unchanged."""
    inner = source.removeprefix(FIRST_CLAUSE_PREFIX)
    if inner != "txt":
        return source
    caption = caption_source(config.data.text_key, config.data.caption_field)
    return source[: len(source) - len(inner)] + caption


def _text_field(config: Config, name: str, spec: TextSpec, tokenizer: Any) -> TextField:
    source, fallback = (
        _caption_source(config, s) if s else s for s in (spec.source, spec.fallback)
    )
    tokenizer_name = ""
    if spec.tokenizer != "model":
        context_length = getattr(tokenizer, "context_length", 77)
        try:
            tokenizer = HFTokenizer(spec.tokenizer, context_length=context_length)
        except (OSError, ValueError) as error:
            raise StartupError(
                f"text field '{name}': tokenizer '{spec.tokenizer}' does not load ({error}); "
                "give a local Hugging Face tokenizer folder or, with a network, a hub name"
            ) from None
        tokenizer_name = spec.tokenizer
    return TextField(name, tokenizer, source, spec.choose, spec.min_words, tokenizer_name, fallback)


def check_data(
    config: Config,
    fields: BatchFields,
    sidecar_commands: Mapping[str, str] | None = None,
    state: Any = None,
    *,
    field_hint: Callable[[str], str] | None = None,
    tokenized_sidecars: Collection[str] = (),
    tokenizer: Any = None,
) -> list[str]:
    """Expand the shard URLs and check that the first shard carries every field the objective
    reads (image, text members or json keys), and that every sidecar file is of this vlp's
    format and has an entry for every training sample (else: how many lack one, and
    ``sidecar_commands``' command that makes it). A missing field is named with
    ``field_hint(field)`` (the objective's :meth:`~vlp.objectives.base.Objective.field_hint`).
    A sidecar made from another caption source than the run's (its ``text_key`` metadata), or,
    for ``tokenized_sidecars``, with another vocabulary than ``tokenizer``'s (its ``tokenizer``
    metadata), is refused with the command that rebuilds it; a file older than these keys is
    accepted with a warning that it cannot be checked.

    With several processes (``state``: the run's Accelerator or PartialState) only the main
    one checks, and its verdict is broadcast: the data are read once per run, not once per
    rank, and every rank raises the same error.

    Raises:
        StartupError: on every rank alike.
    """
    if not config.data.train_shards:
        raise StartupError("data.train_shards is empty; set it to a folder or shard pattern")
    urls = shard_urls(config.data.train_shards, "training", config.data.train_weights)
    commands = sidecar_commands or {}
    tokenized = (frozenset(tokenized_sidecars), tokenizer)
    if state is None or state.num_processes == 1:
        _check_urls(config, urls, fields, commands, field_hint, tokenized)
        return urls
    from accelerate.utils import broadcast_object_list

    verdict, bug = "", None
    if state.is_main_process:
        try:
            _check_urls(config, urls, fields, commands, field_hint, tokenized)
        except StartupError as error:
            verdict = str(error)
        except Exception as error:  # a bug: the other ranks must not wait for a verdict
            verdict, bug = f"the start-up data check failed on the main process: {error!r}", error
    verdict = broadcast_object_list([verdict])[0]
    if bug is not None:
        raise bug
    if verdict:
        raise StartupError(verdict)
    return urls


def _check_urls(
    config: Config,
    urls: list[str],
    fields: BatchFields,
    sidecar_commands: Mapping[str, str],
    field_hint: Callable[[str], str] | None,
    tokenized: tuple[frozenset[str], Any] = (frozenset(), None),
) -> None:
    for sidecar in fields.sidecars:
        if os.path.isfile(sidecar.path):
            command = sidecar_commands.get(sidecar.name, "")
            _check_sidecar(config, urls, sidecar, command)
            _check_sidecar_source(config, sidecar, command, sidecar.name in tokenized[0],
                                  tokenized[1])  # fmt: skip
    try:
        missing = missing_batch_fields(urls, fields, image_keys=config.data.image_keys)
    except ValueError as error:
        raise StartupError(str(error)) from None
    if missing:
        hint = field_hint(missing[0].field) if field_hint else ""
        raise StartupError(
            f"objective '{config.objective.name}': {missing[0]}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + f"; {hint or 'write that field into the shards or pick another objective'}"
        )


def _check_sidecar(config: Config, urls: list[str], sidecar: SidecarField, command: str) -> None:
    """Every training sample has an entry (:func:`sidecar_gaps`: ``sizes.json`` against the
    shards the sidecar records, member names only where they disagree)."""
    try:
        gaps = sidecar_gaps(urls, sidecar.path)
    except SidecarFormatError as error:
        raise StartupError(f"objective '{config.objective.name}': {error}") from None
    except ValueError as error:
        raise StartupError(str(error)) from None
    if not gaps.missing:
        return
    make = _rebuild_command(config, command, sidecar, sidecar_metadata(sidecar.path))
    raise StartupError(
        f"objective '{config.objective.name}': {gaps.missing} of {gaps.total} training samples "
        f"have no entry in sidecar '{sidecar.name}' ({sidecar.path}; first: {gaps.first}); "
        + (f"make it for these shards with: {make}" if make else "remake it for these shards")
    )


def _check_sidecar_source(
    config: Config, sidecar: SidecarField, command: str, tokenized: bool, tokenizer: Any
) -> None:
    """The sidecar was made from the run's caption source (``text_key`` metadata against
    ``data.caption_field`` or ``data.text_key``) and, when ``tokenized``, with the run's
    vocabulary (``tokenizer`` metadata); a file without these keys is accepted with a warning."""
    metadata = sidecar_metadata(sidecar.path)
    source = _caption_source(config, "txt")
    setting = "data.caption_field" if config.data.caption_field else "data.text_key"
    checks = [("text_key", source, f"captions '{{}}', the run reads '{source}' ({setting})")]
    if tokenized and tokenizer is not None:
        ours = tokenizer_identity(tokenizer) if "tokenizer" in metadata else ""
        checks.append(("tokenizer", ours, f"a tokenizer of {{}}, the run's has {ours} "
                       f"(model.name='{config.model.name}', model.tokenizer)"))  # fmt: skip
    unchecked = [key for key, _, _ in checks if key not in metadata]
    if unchecked:
        logger.warning(
            "sidecar '%s' (%s) records no %s (written by an older vlp): it cannot be checked "
            "against this run's; rebuild it if unsure", sidecar.name, sidecar.path,
            " or ".join(unchecked),
        )  # fmt: skip
    for key, ours, says in checks:
        if key not in metadata or metadata[key] == ours:
            continue
        # another vocabulary: the settings that made it would make it again, so none is reused
        make = _rebuild_command(config, command, sidecar, {} if key == "tokenizer" else metadata)
        raise StartupError(
            f"objective '{config.objective.name}': sidecar '{sidecar.name}' ({sidecar.path}) "
            f"was made from {says.format(metadata[key])}; "
            + (f"rebuild it for this run with: {make}" if make else "rebuild it for this run")
        )


def _rebuild_command(
    config: Config, command: str, sidecar: SidecarField, recorded: Mapping[str, str]
) -> str:
    """``command`` (an objective's ``sidecar_commands`` entry; "" for none) for this run's
    shards, sidecar path and caption source: what it writes passes the start-up checks. Its
    other ``{key}`` placeholders take the values the existing file ``recorded`` in its metadata
    (so the command remakes the same sidecar: ProtoCLIP's teacher model, PRIOR's reference),
    or ``KEY`` for the user to fill in where it records none."""
    if not command:
        return ""
    data = config.data
    make = command.format_map(_Recorded(recorded, shards=data.train_shards, path=sidecar.path))
    return make + caption_source_args(data.text_key, data.caption_field)


class _Recorded(dict[str, str]):
    """A sidecar's recorded metadata, shell-quoted, with ``shards`` and ``path`` as given; a
    key it lacks reads as its name in capitals (a placeholder for the user)."""

    def __init__(self, recorded: Mapping[str, str], shards: str, path: str) -> None:
        super().__init__({key: shlex.quote(str(value)) for key, value in recorded.items()})
        self.update(shards=shards, path=path)

    def __missing__(self, key: str) -> str:
        return key.upper()


def stream_settings(
    config: Config, draft_size: int | None = None, pin_memory: bool = False
) -> StreamSettings:
    """The stream settings of the ``data`` section and ``train.seed`` (``draft_size``: the
    views' JPEG draft size, :attr:`StreamParts.draft_size`; ``pin_memory``: its
    :attr:`StreamParts.pin_memory`). The caption's source (``data.text_key``,
    ``data.caption_field``) and ``data.uint8_batches`` go into the fields instead
    (:func:`batch_fields`)."""
    data = config.data
    weights = None if data.train_weights is None else tuple(data.train_weights)
    return StreamSettings(
        batch_size=data.batch_size,
        workers=data.workers,
        accum_steps=config.train.accum_steps,
        streams=data.streams,
        seed=config.train.seed,
        resampled=data.resampled,
        shuffle_buffer=data.shuffle_buffer,
        shards_in_flight=data.shards_in_flight,
        weights=weights,
        image_keys=tuple(data.image_keys),
        draft_size=draft_size,
        prefetch_factor=data.prefetch_factor,
        timeout=data.batch_timeout,
        max_skip_fraction=data.max_skip_fraction,
        remote_timeout=data.remote_timeout,
        remote_retries=data.remote_retries,
        pin_memory=pin_memory,
    )


def build_stream(config: Config, parts: StreamParts, rank: int, world_size: int) -> TrainStream:
    """This rank's training stream, reading exactly the objective's fields."""
    settings = stream_settings(config, parts.draft_size, parts.pin_memory)
    return make_train_stream(
        config.data.train_shards, settings, fields=parts.fields, rank=rank, world_size=world_size
    )


# ------------------------------------------------------------------------------- evaluators


@dataclass
class EvalContext:
    """What every evaluator factory gets: the config and the model's eval-side tools."""

    config: Config
    preprocess_val: Any
    tokenizer: Any
    out_dir: Path


EvaluatorFactory = Callable[[EvalContext], list[Evaluator]]
_EVALUATORS: dict[str, EvaluatorFactory] = {}


def register_evaluator(kind: str) -> Callable[[EvaluatorFactory], EvaluatorFactory]:
    """Register a factory that turns the ``eval`` section into evaluators of one kind."""

    def decorate(factory: EvaluatorFactory) -> EvaluatorFactory:
        _EVALUATORS[kind] = factory
        return factory

    return decorate


@register_evaluator("heldout")
def _heldout(context: EvalContext) -> list[Evaluator]:
    """``eval.zeroshot_shards``: labelled held-out shards, zero-shot and retrieval."""
    config = context.config.eval
    if not config.zeroshot_shards:
        return []
    if not config.classnames:
        raise StartupError("eval.zeroshot_shards is set but eval.classnames is empty")
    urls = shard_urls(config.zeroshot_shards, "eval")
    return [
        HeldoutEvaluator(
            "heldout",
            load_labelled_shards(urls, context.preprocess_val),
            config.classnames,
            config.templates,
            context.tokenizer,
            context.out_dir,
            model_name=context.config.model.name,
            batch_size=config.batch_size,
        )
    ]


@register_evaluator("datasets")
def _datasets(context: EvalContext) -> list[Evaluator]:
    """``eval.datasets``: CLIP_benchmark roots, class folders or CSV tables, by name."""
    config = context.config.eval
    evaluators: list[Evaluator] = []
    for name, path in config.datasets.items():
        try:
            eval_set = open_eval_set(path)
        except EvalDataError as error:
            raise StartupError(f"eval.datasets.{name}: {error}") from None
        evaluators.append(
            DatasetEvaluator(
                name,
                eval_set,
                context.preprocess_val,
                context.tokenizer,
                config.templates,
                context.out_dir,
                model_name=context.config.model.name,
                batch_size=config.batch_size,
            )  # fmt: skip
        )
    return evaluators


def build_evaluators(
    config: Config, preprocess_val: Any, tokenizer: Any, out_dir: Path
) -> list[Evaluator]:
    """Every registered kind's evaluators for the ``eval`` section, in registration order."""
    context = EvalContext(config, preprocess_val, tokenizer, out_dir)
    return [evaluator for factory in _EVALUATORS.values() for evaluator in factory(context)]

"""Build a run's parts from its config: objective, model, batch fields, stream, evaluators.

This is where the three layers meet (vlp knows nothing of shards or eval sets, data_pipelines
and evals nothing of objectives): the objective's declared fields (views with augmentation
presets, text fields with tokenizers, JSON keys) become the stream's ``BatchFields``; the
``eval`` section becomes evaluators through one registry. Every problem a user can fix is a
:class:`StartupError` with one sentence naming the key, field or shard and what to do. The
start-up check that the data and sidecar files agree with these fields is
:mod:`launch.sidecar_checks`'s.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
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
from data_pipelines.shards import split_sources
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
from vlp.config import Config
from vlp.models import PretrainedError, create_model, model_config, preprocess_config
from vlp.models.image_weights import REQUIRED, load_image_weights
from vlp.objectives import Objective, create_objective, objective_class
from vlp.objectives.base import Fields, TextSpec

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

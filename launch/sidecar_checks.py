"""The start-up check that the data and the sidecar files a run needs agree, with the command
that rebuilds a sidecar.

One job, run once before training starts (:func:`check_data`, on the main process only, its
verdict broadcast to every rank): the first shard carries every field the objective reads, and
every sidecar file is of this vlp's format, covers every training sample and was made from the
run's caption source (and, for tokenized sidecars, with its vocabulary). A run that would fail on
its data fails here, in one line (:class:`~launch.build.StartupError`) that names what is wrong
and, for a sidecar, the command that makes it again for this run; :mod:`launch.build` assembles
the run's parts and knows nothing of these checks.
"""

from __future__ import annotations

import logging
import os
import shlex
from collections.abc import Callable, Collection, Mapping
from typing import Any

from data_pipelines.batch_fields import BatchFields, SidecarField
from data_pipelines.fields import missing_batch_fields, sidecar_gaps
from data_pipelines.sidecar import SidecarFormatError, sidecar_metadata
from data_pipelines.text_sources import caption_source
from launch.build import StartupError, shard_urls
from launch.caption_args import caption_source_args
from vlp.config import Config
from vlp.models.vocabulary import tokenizer_identity

logger = logging.getLogger("vlp")


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
    source = caption_source(config.data.text_key, config.data.caption_field)
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
    or ``KEY`` for the user to fill in where it records none; options the writer needed beyond
    the template (``rebuild_options``, shell-quoted by the writer: PRIOR's ``--model`` for a
    transformers reference LM) follow."""
    if not command:
        return ""
    data = config.data
    make = command.format_map(_Recorded(recorded, shards=data.train_shards, path=sidecar.path))
    if options := recorded.get("rebuild_options", ""):
        make += f" {options}"
    return make + caption_source_args(data.text_key, data.caption_field)


class _Recorded(dict[str, str]):
    """A sidecar's recorded metadata, shell-quoted, with ``shards`` and ``path`` as given; a
    key it lacks reads as its name in capitals (a placeholder for the user)."""

    def __init__(self, recorded: Mapping[str, str], shards: str, path: str) -> None:
        super().__init__({key: shlex.quote(str(value)) for key, value in recorded.items()})
        self.update(shards=shards, path=path)

    def __missing__(self, key: str) -> str:
        return key.upper()

"""`vlp prior weights`: PRIOR's reference log-probabilities, precomputed once per sample.

PRIOR weighs caption tokens by 1 − P_r(t_i | t_<i) of a frozen reference LM. Online, P_r runs
at every step; this writes log P_r(t_i | t_<i) of every sample's caption (``[L-1]`` float32,
aligned with CoCa's labels) into one sidecar (:mod:`data_pipelines.sidecar`) keyed by sample
key, which ``objective.prior.sidecar`` reads through the stream instead (the weights, exponent α
included, are then computed from it exactly as online). The file carries an ``id`` that joins
the stream's resume fingerprint. Captions are read whole, from the member ``text_key`` or the
json key ``caption_field`` (``data.text_key`` / ``data.caption_field``), as training reads them;
the file records that source as ``text_key`` (the member, or ``json:<caption_field>``) and the
tokenizer's vocabulary (``tokenizer``,
:func:`~vlp.models.vocabulary.tokenizer_identity`), which the start-up check
compares with the run's (:func:`launch.sidecar_checks.check_data`).
"""

from __future__ import annotations

import json
import shlex
import uuid
from pathlib import Path

from data_pipelines.captions import shard_captions
from data_pipelines.decode import SampleError
from data_pipelines.sidecar import DuplicateKeyError, SidecarWriter
from data_pipelines.text_sources import caption_source
from launch.build import StartupError, shard_urls
from vlp.models import create_model
from vlp.models.tokenizers import run_tokenizer_file
from vlp.models.vocabulary import tokenizer_identity
from vlp.objectives.prior.objective import PAD_ID, load_reference
from vlp.objectives.prior.weights import reference_target_logprobs
from vlp.run_folder import checkpoints_dir, list_checkpoints


def write_reference_sidecar(
    reference: str | Path, shards: str, out: str | Path, *, text_key: str = "txt",
    caption_field: str | None = None, batch_size: int = 256, model: str | None = None,
    tokenizer_file: str | None = None,
) -> int:  # fmt: skip
    """Write log P_r of every caption of ``shards`` into the sidecar ``out`` (atomically; the
    rows stream to a spool beside it, so memory does not grow with the captions); the count.

    ``reference`` is a ``prior_reference`` run (its model and tokenizer read the captions), or
    a transformers causal LM (a local folder or a hub name), checked against the tokenizer of
    the captioning model ``model`` (with ``tokenizer_file``, a SentencePiece one, if it has one).
    Captions come from the json key ``caption_field`` when given, else the member ``text_key``.

    Raises:
        StartupError: a run without a complete checkpoint, a transformers LM without ``model``
            or of another tokenizer, a sample without its caption or a sample key seen twice.
    """
    checkpoints = list_checkpoints(checkpoints_dir(reference))
    if checkpoints:
        meta = json.loads((checkpoints[-1] / "model_config.json").read_text())
        model = meta["model_name"]
        run_tokenizer = run_tokenizer_file(checkpoints[-1])  # the run's model.tokenizer, if any
        tokenizer_file = str(run_tokenizer) if run_tokenizer else None
    elif model is None:
        raise StartupError(
            f"reference '{reference}' holds no complete checkpoint of a `vlp prior "
            "train-reference` run; for a transformers causal LM, name the captioning model "
            "(--model) whose tokenizer it must share"
        )
    try:
        clip, _, _, tokenizer = create_model(model, tokenizer=tokenizer_file)
        lm = load_reference(reference, clip, tokenizer).eval()
    except (ValueError, FileNotFoundError) as error:
        raise StartupError(str(error)) from None
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    source = caption_source(text_key, caption_field)
    # a transformers LM needs the captioning model named again to be rebuilt; a run, its own
    options = [] if checkpoints else ["--model", str(model)]
    options += ["--tokenizer", tokenizer_file] if tokenizer_file and not checkpoints else []
    metadata = {"id": uuid.uuid4().hex, "reference": str(reference), "text_key": source,
                "tokenizer": tokenizer_identity(tokenizer),
                "checkpoint": checkpoints[-1].name if checkpoints else "",
                "rebuild_options": shlex.join(options)}  # fmt: skip
    urls = shard_urls(shards, "training")
    counts = dict.fromkeys(urls, 0)
    pending: list[tuple[str, str]] = []
    writer = SidecarWriter(out, metadata)

    def flush() -> None:
        logprobs, _ = reference_target_logprobs(lm, tokenizer([c for _, c in pending]), PAD_ID)
        writer.add([key for key, _ in pending], logprobs.float())
        pending.clear()

    try:
        for url, key, caption in shard_captions(urls, source):
            counts[url] += 1
            pending.append((key, caption))
            if len(pending) == batch_size:
                flush()
        if pending:
            flush()
        for url, count in counts.items():
            writer.add_shard(url, count)
    except SampleError as error:
        writer.discard()
        raise StartupError(str(error)) from None
    except BaseException:
        writer.discard()
        raise
    try:
        return writer.close()
    except DuplicateKeyError as error:
        raise StartupError(f"sample key '{error.key}' appears twice in {shards}") from None

"""`vlp prior weights`: PRIOR's reference log-probabilities, precomputed once per sample.

PRIOR weighs caption tokens by 1 − P_r(t_i | t_<i) of a frozen reference LM. Online, P_r runs
at every step; this writes log P_r(t_i | t_<i) of every sample's caption (``[L-1]`` float32,
aligned with CoCa's labels) into one safetensors file keyed by sample key, which
``objective.prior.sidecar`` reads through the stream instead (the weights, exponent α
included, are then computed from it exactly as online). The file carries an ``id`` that joins
the stream's resume fingerprint. Captions are read whole (``text_key``), as training reads them.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import torch
from safetensors.torch import save_file

from data_pipelines.captions import shard_captions
from data_pipelines.decode import SampleError
from launch.build import StartupError, shard_urls
from vlp.atomic_files import atomic_path
from vlp.models import create_model
from vlp.models.tokenizers import run_tokenizer_file
from vlp.objectives.prior.objective import PAD_ID, load_reference
from vlp.objectives.prior.weights import reference_target_logprobs
from vlp.run_folder import checkpoints_dir, list_checkpoints


def write_reference_sidecar(
    reference: str | Path, shards: str, out: str | Path, *, text_key: str = "txt",
    batch_size: int = 256, model: str | None = None, tokenizer_file: str | None = None,
) -> int:  # fmt: skip
    """Write log P_r of every caption of ``shards`` into ``out`` (atomically); the count.

    ``reference`` is a ``prior_reference`` run (its model and tokenizer read the captions), or
    a transformers causal LM (a local folder or a hub name), checked against the tokenizer of
    the captioning model ``model`` (with ``tokenizer_file``, a SentencePiece one, if it has one).

    Raises:
        StartupError: a run without a complete checkpoint, a transformers LM without ``model``
            or of another tokenizer, a sample without ``text_key`` or a sample key seen twice.
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
    tensors: dict[str, torch.Tensor] = {}
    pending: list[tuple[str, str]] = []
    seen: set[str] = set()

    def flush() -> None:
        logprobs, _ = reference_target_logprobs(lm, tokenizer([c for _, c in pending]), PAD_ID)
        for (key, _), row in zip(pending, logprobs.float(), strict=True):
            tensors[key] = row.contiguous()
        pending.clear()

    try:
        for _, key, caption in shard_captions(shard_urls(shards, "training"), text_key):
            if key in seen:
                raise StartupError(f"sample key '{key}' appears twice in {shards}")
            seen.add(key)
            pending.append((key, caption))
            if len(pending) == batch_size:
                flush()
    except SampleError as error:
        raise StartupError(str(error)) from None
    if pending:
        flush()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"id": uuid.uuid4().hex, "reference": str(reference), "text_key": text_key,
                "checkpoint": checkpoints[-1].name if checkpoints else ""}  # fmt: skip
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return len(tensors)

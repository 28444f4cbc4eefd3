"""The largest exact global batch one GPU trains with GradCache and the tiled loss (issue 22).

One CLIP training step of ViT-B/32 (224 px, bf16 autocast) at global batches doubling from
65,536 to 1,048,576 (``--batches``), each as vlp's trainer takes it with ``train.accum_steps``
micro-batches: :func:`vlp.training.gradcache.cached_batch_loss` encodes the ``--chunk``-sample
micro-batches without grad and runs vlp's exact tiled contrastive loss
(:func:`vlp.distributed.contrastive_loss`, ``--tile`` rows and columns per tile) once on all B
embeddings, :func:`~vlp.training.gradcache.replay_backward` re-encodes each micro-batch with grad
and back-propagates the cached embedding gradients, then torch's AdamW steps (fused on CUDA). The
inputs are random images and tokens made on the device, one micro-batch at a time from its own
seed (:class:`SyntheticChunks`: no data loading, nothing of the batch held but its embeddings).

Memory is O(B·d) + one micro-batch's activations + O(tile²): nothing is B×B. At B = 1,048,576
and d = 512 each modality's float32 embeddings are 2 GiB; GradCache holds them, their gradients
and a concatenation copy. Per batch it records the time of the step (and its three parts: the
grad-free encoding with the loss and its gradient, the replay, the optimizer), samples/s and the
peak GPU memory; a batch that runs out of memory ends the series, and one whose predicted time
(:func:`predicted_step_s`: the encodings grow with the batch, the loss with its square) would
pass ``--budget-s`` is skipped. First, at ``--reference-batch``, the step's loss and gradients are compared with a plain
full-batch CLIP loss (B×B logits) on the same inputs (in ``--cpu`` mode an assertion, tight in
float32; on the GPU recorded, since bf16 encodings of another batch size round differently).

``--cpu`` is the same at smoke size (the tiny ViT of ``gpu_throughput.py``, batches 64-256, fp32,
seconds): what CI runs, so that the GPU run has nothing left to debug. Prints a table, writes JSON.

    python benchmarks/max_exact_batch.py [--cpu] [--batches B ...] [--chunk N] [--tile T]
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from gpu_throughput import TINY, write_result
from step_timing import autocast, peak_memory_gib, synchronize

from vlp.config import OptimConfig
from vlp.models import create_model
from vlp.models.vlp_model import VlpModel
from vlp.objectives import Objective, create_objective
from vlp.training.gradcache import cached_batch_loss, replay_backward
from vlp.training.optim import create_optimizer

HERE = Path(__file__).resolve().parent
GOAL = 1_048_576
GPU = {
    "model": "ViT-B-32", "batches": [65_536, 131_072, 262_144, 524_288, GOAL], "chunk": 512,
    "tile": 8192, "reference_batch": 512, "precision": "bf16", "budget_s": 540.0,
}  # fmt: skip
CPU = {
    "model": "tiny", "batches": [64, 128, 256], "chunk": 16, "tile": 24,
    "reference_batch": 64, "precision": "fp32", "budget_s": 60.0,
}  # fmt: skip
CPU_TOLERANCE = {"loss": 1e-5, "grad": 1e-4}
"""--cpu: the largest relative difference from the plain loss (its value) and gradients (over the
largest gradient entry) that float32 rounding explains."""


class SyntheticChunks(Sequence[dict[str, torch.Tensor]]):
    """``batch // chunk`` micro-batches of random images ``[chunk, 3, S, S]`` and tokens
    ``[chunk, context]``, each made on ``device`` from its own seed whenever it is read.

    GradCache reads every micro-batch twice (the grad-free encoding, then the replay) and gets the
    same tensors; only the one being encoded is in memory, so a batch of a million images costs
    nothing but its embeddings.
    """

    def __init__(
        self, batch: int, chunk: int, image_size: int, context: int, vocab: int,
        device: torch.device, seed: int = 0,
    ) -> None:  # fmt: skip
        if batch % chunk:
            raise ValueError(f"batch {batch} is not a multiple of the chunk {chunk}")
        self.batch, self.chunk, self.image_size = batch, chunk, image_size
        self.context, self.vocab, self.device, self.seed = context, vocab, device, seed

    def __len__(self) -> int:
        return self.batch // self.chunk

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:  # type: ignore[override]
        if not 0 <= index < len(self):
            raise IndexError(index)
        generator = torch.Generator(self.device).manual_seed(self.seed * 1_000_003 + index)
        size = (self.chunk, 3, self.image_size, self.image_size)
        image = torch.randn(size, generator=generator, device=self.device)
        text = torch.randint(
            1, self.vocab, (self.chunk, self.context), generator=generator, device=self.device
        )
        return {"image": image, "text": text}

    def whole(self) -> dict[str, torch.Tensor]:
        """Every micro-batch concatenated (the plain reference's one batch)."""
        return {k: torch.cat([c[k] for c in self]) for k in ("image", "text")}


@dataclass
class Setup:
    """The model, objective, optimizer and settings every step uses."""

    model: VlpModel
    objective: Objective
    optimizer: torch.optim.Optimizer
    device: torch.device
    precision: str
    image_size: int
    context: int
    vocab: int
    embed_dim: int

    def autocast(self) -> AbstractContextManager[Any]:
        """bf16 autocast on the GPU (``--precision``), as the trainer's ``accelerator.autocast``."""
        return autocast(self.device, self.precision)

    def chunks(self, batch: int, chunk: int, seed: int = 0) -> SyntheticChunks:
        """The micro-batches of a global batch of ``batch`` synthetic samples."""
        return SyntheticChunks(
            batch, chunk, self.image_size, self.context, self.vocab, self.device, seed
        )


def build(model_name: str, device: torch.device, precision: str) -> Setup:
    """CLIP on ``model_name`` (an open_clip name or config path) with AdamW, on ``device``."""
    torch.manual_seed(0)
    clip: Any = create_model(model_name, device=device)[0]  # open_clip's CLIP
    objective = create_objective("clip").to(device)
    model = objective.build_model(clip).to(device)
    model.train()
    optimizer = create_optimizer(model, OptimConfig(), objective.no_decay(model), device)
    size = clip.visual.image_size
    return Setup(
        model, objective, optimizer, device, precision,
        image_size=int(size[0] if isinstance(size, Sequence) else size),
        context=int(clip.context_length), vocab=int(clip.vocab_size),
        embed_dim=int(clip.visual.output_dim),
    )  # fmt: skip


def gradcache_backward(setup: Setup, chunks: SyntheticChunks) -> tuple[float, float, float]:
    """GradCache's two passes on ``chunks``, gradients left on the parameters: (loss, seconds of
    the grad-free encoding with the loss and its gradient, seconds of the replay)."""
    synchronize(setup.device)
    started = time.perf_counter()
    cached = cached_batch_loss(
        setup.model, setup.objective, chunks, autocast=setup.autocast, device=setup.device
    )
    loss = float(cached.loss)  # waits for the loss
    cached_at = time.perf_counter()
    replay_backward(
        setup.model, setup.objective, chunks, cached, backward=lambda x: x.backward(),
        no_sync=lambda _: nullcontext(), autocast=setup.autocast, device=setup.device,
    )  # fmt: skip
    synchronize(setup.device)
    return loss, cached_at - started, time.perf_counter() - cached_at


def train_step(setup: Setup, batch: int, chunk: int) -> dict[str, Any]:
    """One optimizer step at global batch ``batch``: loss, seconds (and their parts),
    samples/s and peak GPU memory."""
    if setup.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(setup.device)
    chunks = setup.chunks(batch, chunk, seed=batch)
    loss, cache_s, replay_s = gradcache_backward(setup, chunks)
    started = time.perf_counter()
    setup.optimizer.step()
    setup.optimizer.zero_grad(set_to_none=True)
    setup.objective.after_step(setup.model)
    synchronize(setup.device)
    optimizer_s = time.perf_counter() - started
    step_s = cache_s + replay_s + optimizer_s
    return {
        "batch": batch, "chunk": chunk, "micro_batches": len(chunks), "loss": loss,
        "step_s": step_s, "cache_s": cache_s, "replay_s": replay_s, "optimizer_s": optimizer_s,
        "samples_per_s": batch / step_s, "peak_memory_gib": peak_memory_gib(setup.device),
        "status": "ok",
    }  # fmt: skip


def _plain_clip_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric cross-entropy with the whole B×B logits matrix (the reference)."""
    logits = scale * image @ text.T
    labels = torch.arange(len(image), device=image.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def reference_check(setup: Setup, batch: int) -> dict[str, Any]:
    """GradCache (4 micro-batches) and the tiled loss (ragged tiles) against the plain loss on
    the whole batch at once: the loss, and the gradients as the largest per-parameter difference
    over that parameter's largest entry and as the norm of all differences over the gradient's
    norm (relative differences)."""
    tile = batch // 3 + 1
    setup.objective.tile_size = tile
    chunks = setup.chunks(batch, batch // 4, seed=1)
    setup.model.zero_grad(set_to_none=True)
    loss, _, _ = gradcache_backward(setup, chunks)
    cached = _grads(setup.model)
    with setup.autocast():
        out = setup.model(setup.objective.model_inputs(chunks.whole()))
    plain = _plain_clip_loss(
        out["image_features"].float(), out["text_features"].float(), out["logit_scale"].float()
    )
    plain.backward()
    plain = plain.detach()
    reference = _grads(setup.model)
    assert cached.keys() == reference.keys()
    grad_diff = max(
        float((cached[n] - g).abs().max() / g.abs().max().clamp_min(1e-30))
        for n, g in reference.items()
    )
    squares = [(float((cached[n] - g).square().sum()), float(g.square().sum())) for n, g in reference.items()]  # fmt: skip
    norm_diff = (sum(d for d, _ in squares) / max(sum(r for _, r in squares), 1e-300)) ** 0.5
    return {
        "batch": batch, "micro_batches": len(chunks), "tile": tile,
        "gradcache_tiled_loss": loss, "plain_loss": float(plain),
        "loss_rel_diff": abs(loss - float(plain)) / abs(float(plain)),
        "grad_max_rel_diff": grad_diff, "grad_norm_rel_diff": norm_diff,
    }  # fmt: skip


def predicted_step_s(row: dict[str, Any], batch: int) -> float:
    """A step's seconds at ``batch``, from a measured ``row``: the encodings grow with the
    batch, the loss with its square. The replay is one forward and its backward (~3 forwards),
    so the grad-free encoding is ~1/3 of it and the rest of ``cache_s`` is the loss."""
    r = batch / row["batch"]
    encode = row["replay_s"] / 3
    loss = max(row["cache_s"] - encode, 0.0)
    return (row["replay_s"] + encode) * r + loss * r * r + row["optimizer_s"]


def measure(setup: Setup, opts: argparse.Namespace, started: float) -> list[dict[str, Any]]:
    """A step at each of ``opts.batches`` in turn, until one runs out of memory; batches whose
    predicted time would pass the budget are skipped."""
    rows: list[dict[str, Any]] = []
    setup.objective.tile_size = opts.tile
    train_step(setup, 2 * opts.chunk, opts.chunk)  # warm-up: kernels chosen, memory pools made
    last: dict[str, Any] | None = None
    for batch in opts.batches:
        left = opts.budget_s - (time.perf_counter() - started)
        predicted = 0.0 if last is None else predicted_step_s(last, batch)
        if predicted > left:
            rows.append({"batch": batch, "status": f"skipped: ~{predicted:.0f} s predicted, {left:.0f} s of --budget-s left"})  # fmt: skip
            continue
        try:
            row = train_step(setup, batch, opts.chunk)
        except torch.OutOfMemoryError as error:
            message = str(error).splitlines()[0]
        else:
            row["embeddings_gib"] = 2 * batch * setup.embed_dim * 4 / 2**30  # float32, 2 sides
            rows.append(row)
            last = row
            print(f"  batch {batch}: {row['step_s']:.1f} s, peak {row['peak_memory_gib']} GiB")
            continue
        peak = peak_memory_gib(setup.device)
        setup.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.empty_cache()
        rows.append({"batch": batch, "peak_memory_gib": peak, "status": f"out of memory: {message}"})  # fmt: skip
        break
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    """One line per batch: time per step and its parts, samples/s, peak memory."""
    header = ["global batch", "micro-batches", "step s", "encode+loss s", "replay s",
              "optimizer s", "samples/s", "peak GiB", "status"]  # fmt: skip
    print(" | ".join(header))
    keys = ["batch", "micro_batches", "step_s", "cache_s", "replay_s", "optimizer_s",
            "samples_per_s", "peak_memory_gib", "status"]  # fmt: skip
    for row in rows:
        cells = [row.get(k) for k in keys]
        print(" | ".join("-" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v) for v in cells))  # fmt: skip


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The options; ``--cpu`` picks the smoke-size defaults."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="smoke size on the CPU (for CI)")
    parser.add_argument("--batches", type=int, nargs="+", help="global batches, in order")
    parser.add_argument("--chunk", type=int, help="samples per micro-batch (GradCache chunk)")
    parser.add_argument("--tile", type=int, help="rows and columns per tile of the loss")
    parser.add_argument("--reference-batch", type=int, help="batch of the plain-loss check")
    parser.add_argument("--budget-s", type=float, help="skip batches predicted to end past this")
    parser.add_argument("--model", help="open_clip model name or config path")
    parser.add_argument("--out", default=None, help="JSON file (default benchmarks/results/)")
    opts = parser.parse_args(argv)
    for key, value in (CPU if opts.cpu else GPU).items():
        if getattr(opts, key, None) is None:
            setattr(opts, key, value)
    name = "max_exact_batch_cpu.json" if opts.cpu else "max_exact_batch.json"
    opts.out = opts.out or str(HERE / "results" / name)
    return opts


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Check against the plain loss, time a step at each batch, print the table, write the
    JSON; returns it."""
    opts = parse(argv)
    started = time.perf_counter()
    device = torch.device("cpu" if opts.cpu or not torch.cuda.is_available() else "cuda")
    with tempfile.TemporaryDirectory(prefix="vlp-max-batch-") as folder:
        model = opts.model
        if model == "tiny":
            model = str(Path(folder) / "vlp-max-batch-tiny.json")
            Path(model).write_text(json.dumps(TINY))
        setup = build(model, device, opts.precision)
    reference = reference_check(setup, opts.reference_batch)
    print(
        f"reference at batch {reference['batch']}: loss {reference['gradcache_tiled_loss']:.6f} "
        f"(plain {reference['plain_loss']:.6f}, relative difference "
        f"{reference['loss_rel_diff']:.2e}; gradients {reference['grad_max_rel_diff']:.2e} per "
        f"parameter, {reference['grad_norm_rel_diff']:.2e} in norm)"
    )
    if opts.cpu:
        assert reference["loss_rel_diff"] < CPU_TOLERANCE["loss"], reference
        assert reference["grad_max_rel_diff"] < CPU_TOLERANCE["grad"], reference
    rows = measure(setup, opts, started)
    print_table(rows)
    fitted = [row["batch"] for row in rows if row["status"] == "ok"]
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "settings": {k: v for k, v in vars(opts).items()},
        "reference": reference,
        "rows": rows,
        "largest_exact_batch": max(fitted, default=None),
        "goal": GOAL,
        "total_s": time.perf_counter() - started,
    }
    print(f"largest exact global batch: {result['largest_exact_batch']} (goal {GOAL})")
    write_result(opts.out, result)
    return result


if __name__ == "__main__":
    main()

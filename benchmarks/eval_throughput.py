"""Evaluation cost: vlp's evals vs CLIP_benchmark's, same model, same data, same machine.

1. Zero-shot classification throughput (images/s, wall clock, everything from reading the
   shards to the metrics): ``evals.tasks.zeroshot_classification`` vs CLIP_benchmark's
   ``zeroshot_classification.evaluate`` over its own ``build_dataset("wds/...")`` DataLoader,
   as its CLI runs it. Same export (``local-dir:``), same CLIP_benchmark-layout shards (written
   by ``data_pipelines.clip_benchmark_layout``), same batch size, fp32 (CB's ``amp=False``),
   same number of decoding workers; rounds alternate which goes first. acc1 must agree.
2. Peak memory of retrieval at 10k images x 50k captions (5 per image) of synthetic
   embeddings: ``evals.retrieval.retrieval_metrics`` (chunked) vs CLIP_benchmark's
   ``zeroshot_retrieval.evaluate`` (dense score and positive-pair matrices), each in a fresh
   subprocess measured with ``vlp.profiling.peak_rss_growth``. Recalls must agree.

The model is the newest checkpoint of ``--run`` if given, else a randomly initialised
vlp-tiny-vit (the cost does not depend on the weights); data and export live in
``runs/bench_eval_throughput/``.
Prints a table and writes ``benchmarks/results/eval_throughput.json``.

    .venv/bin/python benchmarks/eval_throughput.py [--images 2000] [--rounds 2] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "runs" / "bench_eval_throughput"
RESULTS = ROOT / "benchmarks" / "results" / "eval_throughput.json"
RECALL_K = (1, 5, 10)


def prepare(run: Path | None, images: int) -> tuple[Path, Path]:
    """The export of the model and the CLIP_benchmark-layout dataset (the data is reused)."""
    from data_pipelines.clip_benchmark_layout import write_clip_benchmark_layout
    from data_pipelines.synthetic import CLASSNAMES, EVAL_TEMPLATES, generate_samples
    from evals.export import export_run

    export, dataset = WORK / "export", WORK / f"shapes_{images}"
    torch.manual_seed(0)
    export_run(run if run is not None else "vlp-tiny-vit", export, overwrite=True)
    if not (dataset / "test" / "nshards.txt").is_file():
        folder = WORK / f"folder_{images}"
        for sample in generate_samples(images, seed=1, image_size=96):
            target = folder / CLASSNAMES[sample["cls"]]
            target.mkdir(parents=True, exist_ok=True)
            sample["image"].save(target / f"{sample['key']}.jpg", quality=90)
        # 8 shards: CB's webdataset loader needs at least one shard per worker
        per_shard = -(-images // 8)
        write_clip_benchmark_layout(
            folder, dataset, samples_per_shard=per_shard, templates=EVAL_TEMPLATES, overwrite=True
        )
    return export, dataset


def ours_zeroshot(export: Path, dataset: Path, batch_size: int, workers: int) -> dict[str, Any]:
    from evals.datasets import open_eval_set
    from evals.loading import load_model
    from evals.tasks import EncodeOptions, zeroshot_classification

    model, preprocess, tokenizer, _ = load_model(export)
    started = time.perf_counter()
    eval_set = open_eval_set(dataset)
    assert eval_set.classnames is not None and eval_set.templates is not None
    result = zeroshot_classification(
        model, preprocess, tokenizer, eval_set, eval_set.classnames, eval_set.templates,
        EncodeOptions(batch_size, workers, "cpu", None),
    )  # fmt: skip
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "acc1": result.metrics["acc1"], "images": result.images}


def clip_benchmark_zeroshot(
    export: Path, dataset: Path, batch_size: int, workers: int
) -> dict[str, Any]:
    from clip_benchmark.datasets.builder import build_dataset
    from clip_benchmark.metrics import zeroshot_classification
    from clip_benchmark.models import load_clip

    from evals.clip_benchmark_cli import numpy_scalar_fix

    model, transform, tokenizer = load_clip("open_clip", f"local-dir:{export}", "none", None, "cpu")
    model.eval()
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # webdataset's shardshuffle warning
        data = build_dataset(f"wds/{dataset.name}", str(dataset), transform, "test")
    loader = torch.utils.data.DataLoader(
        data.batched(batch_size), batch_size=None, shuffle=False, num_workers=workers
    )
    with numpy_scalar_fix():
        metrics = zeroshot_classification.evaluate(
            model, loader, tokenizer, data.classes, data.templates, "cpu", amp=False
        )
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "acc1": metrics["acc1"]}


def retrieval_probe(kind: str, images: int, per_image: int, dim: int) -> dict[str, Any]:
    """Run in a fresh process: one retrieval evaluation, its peak RSS growth and time."""
    sys.path.insert(0, str(ROOT))  # CLIP_benchmark on given features lives with the tests
    from evals.retrieval import retrieval_metrics
    from tests.evals.clip_benchmark_reference import zeroshot_retrieval
    from vlp.profiling import peak_rss_growth

    generator = torch.Generator().manual_seed(0)
    image_features = F.normalize(torch.randn(images, dim, generator=generator), dim=-1)
    index = torch.arange(images).repeat_interleave(per_image)
    noise = torch.randn(len(index), dim, generator=generator)
    text_features = F.normalize(image_features[index] + 0.7 * noise, dim=-1)

    def work() -> dict[str, float]:
        if kind == "ours":
            return retrieval_metrics(image_features, text_features, index, RECALL_K)
        return zeroshot_retrieval(image_features, text_features, index.tolist(), RECALL_K)

    started = time.perf_counter()
    metrics, grown = peak_rss_growth(work)
    seconds = time.perf_counter() - started
    recalls = {k: v for k, v in metrics.items() if "recall@" in k}
    return {"peak_rss_growth_bytes": grown, "seconds": seconds, "recalls": recalls}


def run_probe(kind: str, images: int, per_image: int, dim: int) -> dict[str, Any]:
    command = [sys.executable, __file__, "--probe", kind, "--retrieval-images", str(images),
               "--per-image", str(per_image), "--dim", str(dim)]  # fmt: skip
    done = subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT)
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="run directory (default: a random model)")
    parser.add_argument("--images", type=int, default=2000, help="zero-shot dataset size")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--retrieval-images", type=int, default=10_000)
    parser.add_argument("--per-image", type=int, default=5)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--probe", choices=("ours", "clip_benchmark"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        print(
            json.dumps(retrieval_probe(args.probe, args.retrieval_images, args.per_image, args.dim))
        )
        return

    export, dataset = prepare(args.run, args.images)
    from evals.datasets import open_eval_set

    count = sum(1 for _ in open_eval_set(dataset).read())
    runs: dict[str, list[dict[str, Any]]] = {"vlp": [], "clip_benchmark": []}
    measure = {"vlp": ours_zeroshot, "clip_benchmark": clip_benchmark_zeroshot}
    for round_index in range(args.rounds):
        order = ["vlp", "clip_benchmark"][:: 1 if round_index % 2 == 0 else -1]
        for name in order:
            runs[name].append(measure[name](export, dataset, args.batch_size, args.workers))
    zeroshot = {
        name: {
            "images_per_s": statistics.median(count / r["seconds"] for r in results),
            "acc1": results[0]["acc1"],
            "rounds": results,
        }
        for name, results in runs.items()
    }
    retrieval = {
        name: run_probe(name, args.retrieval_images, args.per_image, args.dim)
        for name in ("ours", "clip_benchmark")
    }
    report = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "model": str(export),
        "dataset": str(dataset),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "zeroshot": zeroshot,
        "retrieval": retrieval,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")

    print(
        f"\nzero-shot, {args.images} images, batch {args.batch_size}, {args.workers} workers, fp32"
    )
    print(f"{'':<16}{'images/s':>10}{'acc1':>8}")
    for name, row in zeroshot.items():
        print(f"{name:<16}{row['images_per_s']:>10.1f}{row['acc1']:>8.4f}")
    pairs = args.retrieval_images * args.retrieval_images * args.per_image
    print(f"\nretrieval, {args.retrieval_images} images x {args.retrieval_images * args.per_image} "
          f"captions ({pairs / 1e9:.2f}G pairs), d={args.dim}")  # fmt: skip
    print(f"{'':<16}{'peak MiB':>10}{'seconds':>9}  recall@1,5,10 (image | text)")
    for name, row in retrieval.items():
        recalls = row["recalls"]
        shown = " ".join(f"{recalls[f'image_retrieval_recall@{k}']:.4f}" for k in RECALL_K)
        shown += " | " + " ".join(f"{recalls[f'text_retrieval_recall@{k}']:.4f}" for k in RECALL_K)
        print(
            f"{name:<16}{row['peak_rss_growth_bytes'] / 2**20:>10.0f}{row['seconds']:>9.1f}  {shown}"
        )
    print(f"\nwritten: {RESULTS}")


if __name__ == "__main__":
    main()

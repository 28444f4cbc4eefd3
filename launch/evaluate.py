"""`vlp eval zeroshot|retrieval|linear-probe|captioning` and `vlp export`: thin shells over
:mod:`evals`.

Each eval command loads a model reference (a run, checkpoint or export directory, or an
open_clip name with ``--pretrained``), opens each ``--dataset`` (CLIP_benchmark's webdataset
root, vlp's own shards, a folder of class subfolders, or a CSV), runs one CLIP_benchmark task on
each and writes into ``--out`` a CLIP_benchmark-shaped JSON per dataset, named as
CLIP_benchmark names it, plus a PNG with the same stem; then it prints a summary table
(:mod:`launch.eval_summary`). Images that do not decode are reported, counted and left out; the JSON says how many.
Problems a user can fix raise :class:`launch.run.StartupError`, which `vlp` prints as one line.

Register the commands on `vlp`'s parser with :func:`add_eval_commands` and
:func:`add_export_command`.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, Literal

PRECISIONS = ("fp32", "bf16", "fp16")


def _user_errors() -> tuple[type[Exception], ...]:
    from launch.run import StartupError

    return (StartupError,)


def _as_startup_errors(command: Callable[[argparse.Namespace], int]) -> Callable[..., int]:
    """Turn the evals' user-facing errors into StartupError, so `vlp` prints one line."""

    @wraps(command)
    def run(args: argparse.Namespace) -> int:
        from data_pipelines.sources import SourceError
        from evals.eval_set import EvalDataError
        from evals.export_transformers import UnmappableModelError
        from evals.loading import ModelLoadError
        from launch.run import StartupError

        try:
            return command(args)
        except (
            ModelLoadError,
            EvalDataError,
            SourceError,
            FileExistsError,
            UnmappableModelError,
        ) as error:
            raise StartupError(str(error)) from None

    return run


def _read_list_file(path: str, what: str) -> Any:
    """A JSON file (list, or dict for templates) or a text file of non-empty stripped lines."""
    from launch.run import StartupError

    file = Path(path)
    if not file.is_file():
        raise StartupError(f"{what} file '{path}' does not exist")
    text = file.read_text(encoding="utf-8")
    if file.suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise StartupError(f"{what} file '{path}' is not valid JSON: {error}") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise StartupError(f"{what} file '{path}' is empty")
    return lines


def _classnames(args: argparse.Namespace) -> list[str] | None:
    from launch.run import StartupError

    if args.classnames is None:
        return None
    names = _read_list_file(args.classnames, "class names")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise StartupError(f"class names file '{args.classnames}' must list strings")
    return names


def _options(args: argparse.Namespace) -> Any:
    import torch

    from evals.tasks import EncodeOptions

    dtypes = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    workers = default_workers() if args.workers is None else args.workers
    return EncodeOptions(args.batch_size, workers, device, dtypes[args.precision])


def default_workers() -> int:
    """Image decoding processes by default: 4, or fewer on a machine with fewer usable cores
    (more would only make torch's DataLoader warn and the processes compete)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return min(4, cores or 1)


def _open(
    args: argparse.Namespace,
    dataset: str,
    task: Literal["classification", "retrieval"],
    **kwargs: Any,
) -> Any:
    """``open_eval_set`` for ``task`` with the column flags."""
    from evals.datasets import open_eval_set

    return open_eval_set(
        dataset,
        split=args.split,
        task=task,
        image_column=args.image_column,
        label_column=args.label_column,
        caption_column=args.caption_column,
        **kwargs,
    )


def _write(args: argparse.Namespace, info: Any, dataset: str, result: Any) -> Path:
    """Write the result JSON into ``--out`` (CB's name) and say where; return its path."""
    from evals.batches import describe_skips
    from evals.results import result_filename, write_result

    names = {"dataset": dataset, "model": info.name, "pretrained": info.pretrained}
    path = Path(args.out) / result_filename(**names, task=result.task)
    extra = {"images_evaluated": result.images, **describe_skips(result.skipped), **result.extra}
    write_result(path, **names, task=result.task, metrics=result.metrics, **extra)
    print(f"{result.task} of {info.name} ({info.pretrained}) on {dataset}:")
    print(f"  images: {result.images} evaluated, {len(result.skipped)} skipped (did not decode)")
    print(f"  results: {path}")
    print(f"  plot:    {result.plot(path.with_suffix('.png'))}")
    return path


def _print_summary(results: list[tuple[str, Any]]) -> None:
    from launch.eval_summary import summary_table

    print()
    print(summary_table([(name, result.metrics) for name, result in results]))


def _evaluate_each(
    args: argparse.Namespace,
    options: Any,
    jobs: list[tuple[Any, Any]],
    run: Callable[[Any, Any, Any, Any, Any], Any],
) -> int:
    """Load the model once, then for each ``(eval_set, extra)`` of ``jobs`` (checked before the
    model loads) ``run(model, preprocess, tokenizer, eval_set, extra)``; write each result and
    print the summary table."""
    from evals.loading import load_model

    model, preprocess, tokenizer, info = load_model(
        args.model, args.pretrained, device=options.device
    )
    results = []
    for eval_set, extra in jobs:
        result = run(model, preprocess, tokenizer, eval_set, extra)
        _write(args, info, eval_set.name, result)
        results.append((eval_set.name, result))
    _print_summary(results)
    return 0


@_as_startup_errors
def zeroshot_command(args: argparse.Namespace) -> int:
    """`vlp eval zeroshot`: zero-shot classification per dataset, JSON + confusion-matrix PNG."""
    from evals.tasks import zeroshot_classification
    from evals.zeroshot import DEFAULT_TEMPLATES, expand_prompts
    from launch.run import StartupError

    options = _options(args)
    classnames = _classnames(args)
    given = _read_list_file(args.templates, "templates") if args.templates else None
    jobs = []
    for dataset in args.dataset:  # every dataset is checked before the model loads
        eval_set = _open(args, dataset, "classification", classnames=classnames)
        if eval_set.kind == "retrieval":
            raise StartupError(f"{dataset} is a retrieval dataset: use `vlp eval retrieval`")
        if eval_set.classnames is None:
            raise StartupError(f"{dataset} has no class names; give them with --classnames")
        templates = given or eval_set.templates or list(DEFAULT_TEMPLATES)
        try:
            expand_prompts(eval_set.classnames, templates)
        except ValueError as error:  # no {c}, a CuPL dict missing a class, ...
            raise StartupError(f"templates: {error}") from None
        jobs.append((eval_set, templates))

    def run(model: Any, preprocess: Any, tokenizer: Any, eval_set: Any, templates: Any) -> Any:
        return zeroshot_classification(
            model, preprocess, tokenizer, eval_set, eval_set.classnames, templates, options
        )

    return _evaluate_each(args, options, jobs, run)


@_as_startup_errors
def retrieval_command(args: argparse.Namespace) -> int:
    """`vlp eval retrieval`: image-text retrieval per dataset, JSON + recall@k PNG."""
    from evals.tasks import zeroshot_retrieval

    options = _options(args)
    jobs = [(_open(args, dataset, "retrieval"), None) for dataset in args.dataset]

    def run(model: Any, preprocess: Any, tokenizer: Any, eval_set: Any, _: Any) -> Any:
        return zeroshot_retrieval(model, preprocess, tokenizer, eval_set, args.recall_k, options)

    return _evaluate_each(args, options, jobs, run)


@_as_startup_errors
def linear_probe_command(args: argparse.Namespace) -> int:
    """`vlp eval linear-probe`: logistic regression on frozen features, JSON + PNG."""
    from evals.datasets import open_eval_set
    from evals.loading import load_model
    from evals.tasks import linear_probe_task
    from evals.wds_layout import is_clip_benchmark_wds
    from launch.run import StartupError

    if args.train_dataset is None and not is_clip_benchmark_wds(args.dataset, args.train_split):
        raise StartupError(
            f"{args.dataset} has no '{args.train_split}' split to train the probe on; "
            "give the training set with --train-dataset"
        )
    options = _options(args)
    classnames = _classnames(args)
    test_set = _open(args, args.dataset, "classification", classnames=classnames)
    train_set = open_eval_set(
        args.train_dataset or args.dataset,
        split=args.train_split,
        classnames=classnames,
        task="classification",
        image_column=args.image_column,
        label_column=args.label_column,
        caption_column=args.caption_column,
    )
    model, preprocess, _, info = load_model(args.model, args.pretrained, device=options.device)
    result = linear_probe_task(
        model,
        preprocess,
        train_set,
        test_set,
        fewshot_k=args.fewshot_k,
        validation_fraction=args.val_fraction,
        seed=args.seed,
        options=options,
    )
    _write(args, info, test_set.name, result)
    _print_summary([(test_set.name, result)])
    return 0


@_as_startup_errors
def captioning_command(args: argparse.Namespace) -> int:
    """`vlp eval captioning`: a CoCa's captions per dataset, BLEU-4 and CIDEr, JSON + PNG grid."""
    from evals.captioning import MIN_LEN, CaptioningError, captioning_task
    from launch.run import StartupError

    options = _options(args)
    jobs = [(_open(args, dataset, "retrieval"), None) for dataset in args.dataset]

    def run(model: Any, preprocess: Any, tokenizer: Any, eval_set: Any, _: Any) -> Any:
        try:
            return captioning_task(
                model,
                preprocess,
                tokenizer,
                eval_set,
                method=args.method,
                max_len=args.max_len,
                min_len=args.min_len or MIN_LEN,
                num_beams=args.num_beams,
                options=options,
            )
        except CaptioningError as error:
            raise StartupError(f"{args.model}: {error}") from None

    return _evaluate_each(args, options, jobs, run)


@_as_startup_errors
def export_command(args: argparse.Namespace) -> int:
    """`vlp export RUN_DIR OUT [--format open_clip|transformers]`: open_clip's hub layout,
    loadable as ``local-dir:OUT``, or a transformers ``CLIPModel`` folder."""
    from evals.export import export_run

    out = export_run(args.run_dir, args.out, overwrite=args.overwrite, format=args.format)
    print(f"exported {args.run_dir} to {out}")
    if args.format == "transformers":
        print(f"  transformers: CLIPModel.from_pretrained('{out}'), ", end="")
        print(f"CLIPProcessor.from_pretrained('{out}', backend='pil')")
    else:
        print(f"  open_clip: open_clip.create_model_and_transforms('local-dir:{out}')")
    return 0


def positive_int(text: str) -> int:
    """argparse type: an integer > 0."""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _common(parser: argparse.ArgumentParser, *, several: bool = True) -> None:
    from data_pipelines.columns import COLUMNS

    parser.add_argument(
        "--model",
        required=True,
        help="run directory (newest checkpoint), checkpoint or export directory, or open_clip "
        "model name",
    )
    parser.add_argument("--pretrained", help="open_clip pretrained tag or weights file")
    parser.add_argument(
        "--dataset",
        required=True,
        action="append" if several else "store",
        help="CLIP_benchmark webdataset root, vlp's shards (`vlp shards write`), folder of class "
        "subfolders, or .csv/.tsv" + ("; repeat to evaluate several" if several else ""),
    )
    parser.add_argument("--split", default="test", help="split of a webdataset root")
    parser.add_argument("--out", required=True, help="folder for the result JSON and PNG")
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=256,
        help="images per forward pass (default: 256)",
    )
    parser.add_argument(
        "--workers", type=int, help="image decoding processes (default: 4, at most the cores)"
    )
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32", help="autocast dtype")
    for role in ("image", "caption", "label"):
        parser.add_argument(
            f"--{role}-column",
            help=f"tables: the {role} column (default: the one of {', '.join(COLUMNS[role])})",
        )


def add_eval_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register `vlp eval zeroshot|retrieval|linear-probe|captioning` on `vlp`'s subcommand
    parsers."""
    evaluate = subparsers.add_parser(
        "eval",
        help="zero-shot classification, retrieval, linear probe or captioning, as CLIP_benchmark",
    )
    tasks = evaluate.add_subparsers(dest="eval_command", required=True)

    zeroshot = tasks.add_parser("zeroshot", help="zero-shot classification from class prompts")
    _common(zeroshot)
    zeroshot.add_argument(
        "--classnames", metavar="FILE", help="a file: one class name per line, or a JSON list"
    )
    zeroshot.add_argument(
        "--templates",
        metavar="FILE",
        help="a file: one template with {c} per line, a JSON list, or a JSON object class -> "
        "prompts (CuPL); default: the dataset's, else 'a photo of a {c}.'",
    )
    zeroshot.set_defaults(func=zeroshot_command, user_errors=_user_errors)

    retrieval = tasks.add_parser("retrieval", help="image<->text retrieval recall@k")
    _common(retrieval)
    retrieval.add_argument(
        "--recall-k",
        type=positive_int,
        nargs="+",
        default=[1, 5, 10],
        metavar="K",
        help="recall@K for each K, image->text and text->image (default: 1 5 10)",
    )
    retrieval.set_defaults(func=retrieval_command, user_errors=_user_errors)

    probe = tasks.add_parser("linear-probe", help="logistic regression on frozen image features")
    _common(probe, several=False)
    probe.add_argument(
        "--train-dataset", help="training set (default: --dataset, split --train-split)"
    )
    probe.add_argument("--train-split", default="train", help="split of a webdataset root")
    probe.add_argument(
        "--classnames", metavar="FILE", help="a file: one class name per line, or a JSON list"
    )
    probe.add_argument("--fewshot-k", type=positive_int, help="train on k images per class")
    probe.add_argument(
        "--val-fraction",
        type=float,
        default=0.2,
        help="training images held out to choose the weight decay (default: 0.2)",
    )
    probe.add_argument(
        "--seed", type=int, default=0, help="of the few-shot pick and the split (default: 0)"
    )
    probe.set_defaults(func=linear_probe_command, user_errors=_user_errors)

    captioning = tasks.add_parser(
        "captioning", help="captions of a CoCa model, BLEU-4 and CIDEr against the dataset's"
    )
    _common(captioning)
    captioning.add_argument(
        "--method", choices=("greedy", "beam"), default="greedy", help="decoding (default: greedy)"
    )
    captioning.add_argument(
        "--max-len",
        type=positive_int,
        default=None,
        help="tokens per caption, start token included (default: 30, or the model's context "
        "length if shorter)",
    )
    captioning.add_argument(
        "--min-len",
        type=positive_int,
        default=None,
        help="no end token before this many tokens, start token included (default: 5, "
        "open_clip's; 2 lets one-word captions end)",
    )
    captioning.add_argument(
        "--num-beams", type=positive_int, default=6, help="for --method beam (default: 6)"
    )
    captioning.set_defaults(func=captioning_command, user_errors=_user_errors)


def add_export_command(subparsers: argparse._SubParsersAction) -> None:
    """Register `vlp export RUN_DIR OUT` on `vlp`'s subcommand parsers."""
    export = subparsers.add_parser(
        "export",
        help="write a run's newest checkpoint in open_clip's hub layout or as a transformers CLIP",
    )
    export.add_argument("run_dir", help="run directory (or checkpoint / export / model name)")
    export.add_argument("out", help="output folder (must be empty)")
    export.add_argument(
        "--format",
        choices=("open_clip", "transformers"),  # evals.export.EXPORT_FORMATS
        default="open_clip",
        help="open_clip: open_clip's hub layout, loadable as local-dir:OUT (default); "
        "transformers: a CLIPModel folder (plain open_clip ViT CLIPs only)",
    )
    export.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    export.set_defaults(func=export_command, user_errors=_user_errors)

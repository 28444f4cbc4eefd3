"""The `vlp` command: `vlp demo`, `vlp train [--check]`, `vlp shards write|validate|inspect|attach`,
`vlp prior train-reference|weights`, `vlp protoclip teacher`, `vlp eval zeroshot|retrieval|
linear-probe|captioning`, `vlp export`, `vlp watch` — thin shells over tested functions."""

from __future__ import annotations

import argparse
import json
import os
import posixpath
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from data_pipelines.columns import COLUMNS
from launch.evaluate import add_eval_commands, add_export_command, positive_int
from launch.failure import rank_and_world, report_failure
from launch.watch import add_watch_command
from vlp.config import ConfigError, load_config

DEMO_RECIPE = Path(__file__).parent / "configs" / "demo.yaml"
PRIOR_REFERENCE_RECIPE = Path(__file__).parent / "configs" / "prior_reference.yaml"

if TYPE_CHECKING:
    from data_pipelines.prepare import Skipped


def _train(args: argparse.Namespace) -> int:
    from launch.run import check, train

    config = load_config(args.config, args.overrides)
    if args.check:
        plan = check(config)
        print("config, shards and sample fields OK; one training step ran.")
        print(f"  model:          {plan.model} ({plan.parameters / 1e6:.1f}M parameters)")
        print(f"  objective:      {plan.objective} (first-step loss {plan.first_step_loss:.4f})")
        print(f"  processes:      {plan.world_size}")
        print(f"  global batch:   {plan.global_batch}")
        print(f"  steps:          {plan.steps}")
        print(f"  samples seen:   {plan.samples_seen}")
        print(f"  train shards:   {plan.train_shards}")
        print(f"  output dir:     {plan.out_dir}")
        return 0
    result = train(config)
    if result.interrupted:
        return EXIT_PREEMPTED
    return 0 if result.step > 0 else 1


EXIT_PREEMPTED = 75
"""`vlp train`'s status after SIGTERM/SIGUSR1 (EX_TEMPFAIL): a checkpoint was written and the
same command with train.resume=latest continues; schedulers can requeue on it."""


def _prior_train_reference(args: argparse.Namespace) -> int:
    """`vlp prior train-reference`: `vlp train` with the reference-LM recipe on these shards."""
    args.overrides = [f"data.train_shards={args.shards}", f"train.out_dir={args.out}",
                      *args.overrides]  # fmt: skip
    args.check = False
    return _train(args)


def _prior_weights(args: argparse.Namespace) -> int:
    """`vlp prior weights`: log P_r of every caption, keyed by sample key."""
    from launch.prior_weights import write_reference_sidecar

    count = write_reference_sidecar(
        args.reference, args.shards, args.out, text_key=args.text_key, model=args.model,
        tokenizer_file=args.tokenizer,
    )  # fmt: skip
    print(f"wrote log P_r of {count} captions to {args.out}; train with "
          f"objective.prior.sidecar={args.out}")  # fmt: skip
    return 0


def _add_prior(commands: argparse._SubParsersAction) -> None:
    prior = commands.add_parser("prior", help="PRIOR's reference LM (train it before `prior`)")
    sub = prior.add_subparsers(dest="prior_command", required=True)
    reference = sub.add_parser(
        "train-reference",
        help="train the text-only reference LM P_r on the shards' captions (no images)",
        description="Trains objective prior_reference (a causal LM over the captioning model's "
        "tokenizer) with the same trainer as `vlp train`: checkpoints, train.resume=latest, and "
        "`accelerate launch launch/pretrain.py --config <recipe>` for several processes. The run "
        "folder is what objective.prior.reference names.",
    )
    reference.add_argument("--shards", required=True, help="training shards (folder/pattern/URL)")
    reference.add_argument("--out", required=True, help="run folder of the reference LM")
    reference.add_argument(
        "--config",
        default=str(PRIOR_REFERENCE_RECIPE),
        help="recipe (default: launch/configs/prior_reference.yaml, CoCa ViT-B/32's tokenizer; "
        "prior_reference_demo.yaml for the tiny CoCa)",
    )
    reference.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.steps=200")
    reference.set_defaults(func=_prior_train_reference, user_errors=_run_errors)
    weights = sub.add_parser(
        "weights",
        help="precompute P_r's log-probabilities of every caption (objective.prior.sidecar)",
    )
    weights.add_argument(
        "--reference",
        required=True,
        help="a `train-reference` run folder, or a transformers causal LM (folder or hub name)",
    )
    weights.add_argument(
        "--model",
        help="with a transformers LM: the captioning model (model.name) whose tokenizer it must "
        "share and that reads the captions",
    )
    weights.add_argument(
        "--tokenizer", help="with --model: its SentencePiece tokenizer (model.tokenizer), if any"
    )
    weights.add_argument("--shards", required=True, help="the shards PRIOR will train on")
    weights.add_argument("--out", required=True, help="the .safetensors file to write")
    weights.add_argument("--text-key", default="txt", help="caption member (default: txt)")
    weights.set_defaults(func=_prior_weights, user_errors=_run_errors)


def _protoclip_teacher(args: argparse.Namespace) -> int:
    """`vlp protoclip teacher`: the external teacher's embedding of every caption, by key."""
    from safetensors import safe_open

    from launch.protoclip_teacher import write_teacher_sidecar

    model = {"model": args.model} if args.model else {}  # else the function's default
    out = write_teacher_sidecar(args.shards, args.out, dim=args.dim, text_key=args.text_key,
                                batch_size=args.batch_size, **model)  # fmt: skip
    if rank_and_world()[0] == 0:  # once under `accelerate launch`
        with safe_open(str(out), "pt") as handle:
            samples = (handle.metadata() or {}).get("samples", "?")
        print(f"wrote the teacher embeddings of {samples} samples to {out}; train with "
              f"objective.protoclip.teacher={out}")  # fmt: skip
    return 0


def _add_protoclip(commands: argparse._SubParsersAction) -> None:
    protoclip = commands.add_parser("protoclip", help="ProtoCLIP's external teacher")
    sub = protoclip.add_subparsers(dest="protoclip_command", required=True)
    teacher = sub.add_parser(
        "teacher",
        help="precompute the external teacher's text embeddings (objective.protoclip.teacher)",
        description="Embeds every caption with a frozen text model (last layer, mean-pooled, "
        "L2-normalised), reduces them by PCA fitted on all samples to --dim, and writes one "
        "float32 [dim] tensor per sample key into one safetensors file (ProtoCLIP, arXiv "
        "2206.10996, 'external teacher': RoBERTa-large, PCA to 64). Under `accelerate launch "
        "-m launch.cli protoclip teacher ...` the processes split the shards.",
    )
    teacher.add_argument("shards", help="the shards ProtoCLIP will train on (folder/pattern/URL)")
    teacher.add_argument(
        "--out",
        help="the .safetensors file to write (default: protoclip_teacher.safetensors in the "
        "first shard's folder; required for remote shards)",
    )
    teacher.add_argument(
        "--model",
        help="teacher: a folder, a vlp: alias or a hub name such as roberta-large, the paper's "
        "(default: vlp:all-minilm-l6-v2, installed with vlp, no network)",
    )
    teacher.add_argument("--dim", type=positive_int, default=64, help="PCA width (default: 64)")
    teacher.add_argument("--text-key", default="txt", help="caption member (default: txt)")
    teacher.add_argument(
        "--batch-size", type=positive_int, default=64, help="captions per forward (default: 64)"
    )
    teacher.set_defaults(func=_protoclip_teacher, user_errors=_run_errors)


def _demo(args: argparse.Namespace) -> int:
    from launch.demo import run_demo

    run_demo(args.out, args.overrides, args.config)
    return 0


def _run_errors() -> tuple[type[Exception], ...]:
    from launch.run import StartupError
    from vlp.training import CheckpointWriteError

    return (ConfigError, StartupError, CheckpointWriteError)


def _shards_errors() -> tuple[type[Exception], ...]:
    from data_pipelines.decode import SampleError
    from data_pipelines.sources import SourceError

    return (SourceError, SampleError, FileExistsError, FileNotFoundError, NotADirectoryError)


def _shards_write(args: argparse.Namespace) -> int:
    import fsspec

    from data_pipelines.sources import DEFAULT_TEMPLATE, class_names, read_source
    from data_pipelines.write import write_shards

    if args.layout == "clip_benchmark":
        return _shards_write_clip_benchmark(args)
    skipped: list[Skipped] = []
    samples = read_source(
        args.source,
        templates=args.caption_template or [DEFAULT_TEMPLATE],
        image_column=args.image_column,
        caption_column=args.caption_column,
        on_skip=skipped.append,
        shuffle=not args.no_shuffle,
        seed=args.seed,
    )
    names = class_names(args.source) if os.path.isdir(args.source) else None
    paths = write_shards(
        samples,
        args.out,
        samples_per_shard=args.samples_per_shard,
        image_format=args.image_format,
        quality=args.quality,
        overwrite=args.overwrite,
        max_side=args.max_side,
        workers=args.workers,
        on_skip=skipped.append,
        classnames=names,
    )
    with fsspec.open(posixpath.join(args.out, "sizes.json"), "rt") as f:
        written = sum(json.load(f).values())
    print(f"wrote {written} samples in {len(paths)} shards to {args.out}")
    if names is not None:
        print(f"classes (cls 0..{len(names) - 1}): {json.dumps(names)}")
    _print_skipped(skipped)
    return 0 if written else 1


def _print_skipped(skipped: Sequence[Skipped]) -> None:
    if skipped:
        print(f"skipped {len(skipped)} samples:")
        for item in skipped[:20]:
            print(f"  {item.where}: {item.reason}")
        if len(skipped) > 20:
            print(f"  ... and {len(skipped) - 20} more")


def _shards_write_clip_benchmark(args: argparse.Namespace) -> int:
    """`vlp shards write --layout clip_benchmark`: CLIP_benchmark's webdataset layout."""
    from data_pipelines.clip_benchmark_layout import write_clip_benchmark_layout
    from data_pipelines.sources import DEFAULT_TEMPLATE

    try:
        written = write_clip_benchmark_layout(
            args.source,
            args.out,
            split=args.split,
            templates=args.caption_template or [DEFAULT_TEMPLATE],
            image_format=args.image_format,
            quality=args.quality,
            samples_per_shard=args.samples_per_shard,
            max_side=args.max_side,
            workers=args.workers,
            overwrite=args.overwrite,
            image_column=args.image_column,
            label_column=args.label_column,
            caption_column=args.caption_column,
        )
    except ValueError as error:  # SourceError included: printed as one line by `vlp`
        from data_pipelines.sources import SourceError

        raise SourceError(str(error)) from None
    print(
        f"wrote {written.samples} samples in {written.shards} shards to "
        f"{args.out}/{args.split} ({written.kind}, CLIP_benchmark layout)"
    )
    if written.classnames is not None:
        print(f"classes: {json.dumps(written.classnames)}")
    print(
        f"evaluate: vlp eval ... --dataset {args.out} (clip_benchmark: --dataset_root {args.out})"
    )
    _print_skipped(written.skipped)
    return 0


def _shards_validate(args: argparse.Namespace) -> int:
    from data_pipelines.validate import format_report, validate_shards

    report = validate_shards(args.shards, caption_key=args.caption_key)
    print(json.dumps(report.to_json(), indent=1) if args.json else format_report(report))
    return 0 if report.ok else 1


def _attach_errors() -> tuple[type[Exception], ...]:
    from data_pipelines.attach import AttachError

    return (*_shards_errors(), AttachError)


def _shards_attach(args: argparse.Namespace) -> int:
    from data_pipelines.attach import attach_fields

    report = attach_fields(
        args.shards, args.jsonl, args.out, overwrite=args.overwrite, require_all=args.require_all
    )
    unused = f" (e.g. {', '.join(report.unused_examples)})" if report.unused_records else ""
    print(
        f"attached {report.attached} records to {report.samples} samples in {report.shards} "
        f"shards -> {args.out}: {report.without_record} samples without a record, "
        f"{report.unused_records} unused records{unused}, {report.overridden} json keys replaced"
    )
    return 0


def _shards_inspect(args: argparse.Namespace) -> int:
    from data_pipelines.preview import describe, first_samples, write_grid

    previews = first_samples(args.shards, args.n, caption_key=args.caption_key)
    print(describe(previews))
    print(f"grid: {write_grid(previews, args.grid)}")
    return 0


def _add_shards(commands: argparse._SubParsersAction) -> None:
    shards = commands.add_parser(
        "shards", help="write, validate, inspect and attach fields to webdataset shards"
    )
    sub = shards.add_subparsers(dest="shards_command", required=True)

    write = sub.add_parser(
        "write",
        help="write img2dataset-layout shards (or CLIP_benchmark's layout, --layout) from a "
        "class folder or a csv/tsv/parquet/jsonl",
    )
    write.add_argument("source", help="folder of class subfolders, or .csv/.tsv/.parquet/.jsonl")
    write.add_argument("out", help="output folder or fsspec URL (must be empty)")
    write.add_argument(
        "--samples-per-shard",
        type=positive_int,
        default=1000,
        help="samples per .tar (default: 1000)",
    )
    write.add_argument("--max-side", type=positive_int, help="shrink larger images to this side")
    write.add_argument("--workers", type=positive_int, default=1, help="image worker processes")
    write.add_argument("--image-format", choices=("jpg", "png", "webp"), default="jpg")
    write.add_argument("--quality", type=positive_int, default=95, help="jpg/webp quality")
    write.add_argument("--overwrite", action="store_true", help="replace shards already in OUT")
    write.add_argument(
        "--caption-template",
        action="append",
        help="folder sources: caption with {c} for the class name; repeat to use several in "
        "turn (default: 'a photo of a {c}.')",
    )
    write.add_argument(
        "--layout",
        choices=("img2dataset", "clip_benchmark"),
        default="img2dataset",
        help="img2dataset: training shards (default); clip_benchmark: CLIP_benchmark's "
        "webdataset layout for evaluation (class folder or csv/tsv; --caption-template gives "
        "its zero-shot templates)",
    )
    write.add_argument("--split", default="test", help="clip_benchmark layout: the split")
    write.add_argument(
        "--no-shuffle",
        action="store_true",
        help="keep the source order (default: samples are shuffled across shards, seeded, so "
        "that a shard of a class folder does not hold one class)",
    )
    write.add_argument("--seed", type=int, default=0, help="seed of that shuffle (default: 0)")
    for role in ("image", "caption", "label"):
        write.add_argument(
            f"--{role}-column",
            help=f"tables: the {role} column (default: the one of {', '.join(COLUMNS[role])})"
            + ("; clip_benchmark layout only" if role == "label" else ""),
        )
    write.set_defaults(func=_shards_write, user_errors=_shards_errors)

    validate = sub.add_parser(
        "validate", help="read every sample; exit 1 if anything is wrong, 0 if clean"
    )
    validate.add_argument("shards", help="shard folder, brace pattern or URL")
    validate.add_argument("--json", action="store_true", help="print a machine-readable report")
    validate.add_argument("--caption-key", default="txt", help="caption member (default: txt)")
    validate.set_defaults(func=_shards_validate, user_errors=_shards_errors)

    inspect = sub.add_parser("inspect", help="print the first samples and draw them in a PNG")
    inspect.add_argument("shards", help="shard folder, brace pattern or URL")
    inspect.add_argument("-n", type=positive_int, default=16, help="samples to show (default: 16)")
    inspect.add_argument("--grid", default="shards_inspect.png", help="PNG to write")
    inspect.add_argument("--caption-key", default="txt", help="caption member (default: txt)")
    inspect.set_defaults(func=_shards_inspect, user_errors=_shards_errors)

    attach = sub.add_parser(
        "attach",
        help="copy shards into OUT with fields (summary, objects, ...) from a JSONL merged into "
        "each sample's json by key",
    )
    attach.add_argument("shards", help="shard folder, brace pattern or URL")
    attach.add_argument(
        "--jsonl", required=True, help='records, one a line: {"key": <sample key>, <field>: ...}'
    )
    attach.add_argument("--out", required=True, help="output folder (new shards, same names)")
    attach.add_argument("--overwrite", action="store_true", help="replace shards already in OUT")
    attach.add_argument(
        "--require-all", action="store_true", help="a sample without a record is an error"
    )
    attach.set_defaults(func=_shards_attach, user_errors=_attach_errors)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `vlp` (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(prog="vlp", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser(
        "train", help="pretrain from a YAML config plus key=value overrides"
    )
    train.add_argument("--config", help="YAML run config (e.g. launch/configs/demo.yaml)")
    train.add_argument("--check", action="store_true", help="validate, run one step, print plan")
    train.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.steps=200")
    train.set_defaults(func=_train, user_errors=_run_errors)

    demo = commands.add_parser("demo", help="write synthetic shards, train a tiny CLIP, evaluate")
    demo.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    demo.add_argument(
        "--config",
        default=str(DEMO_RECIPE),
        help="demo recipe (default: launch/configs/demo.yaml; convirt_demo.yaml for ConVIRT)",
    )
    demo.add_argument("overrides", nargs="*", help="section.key=value overrides of the demo config")
    demo.set_defaults(func=_demo, user_errors=_run_errors)

    _add_shards(commands)
    _add_prior(commands)
    _add_protoclip(commands)
    add_eval_commands(commands)
    add_export_command(commands)
    add_watch_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run `vlp` with ``argv``; user errors print one line and return 2, no traceback.

    Each command names its user errors lazily (``user_errors``), so that `vlp shards` does not
    pay the seconds `launch.run` takes to import. Under a launcher with several ranks, a bug's
    traceback is reported like a user error (once, by the first rank to fail; status 1): the
    ranks it brings down with it would otherwise print theirs above and below it.
    """
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except Exception as error:
        if isinstance(error, args.user_errors()):
            report_failure(str(error))
            return 2
        if rank_and_world()[1] == 1:
            raise
        report_failure(f"{type(error).__name__}: {error}", details=traceback.format_exc())
        return 1


if __name__ == "__main__":
    sys.exit(main())

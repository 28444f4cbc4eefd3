"""`vlp shards write|validate|inspect|attach|convert-sidecar`: write, check, preview and extend
webdataset shards, and convert an old sidecar. Each command imports what it runs when it runs,
and none imports `launch.run`."""

from __future__ import annotations

import argparse
import json
import os
import posixpath
from collections.abc import Sequence
from typing import TYPE_CHECKING

from data_pipelines.columns import COLUMNS
from launch.evaluate import positive_int
from vlp.wording import count

if TYPE_CHECKING:
    from data_pipelines.prepare import Skipped


def _shards_errors() -> tuple[type[Exception], ...]:
    from data_pipelines.decode import SampleError
    from data_pipelines.sources import SourceError
    from data_pipelines.write import NothingWritten

    return (
        SourceError, SampleError, NothingWritten, FileExistsError, FileNotFoundError,
        NotADirectoryError,
    )  # fmt: skip


def _shards_write(args: argparse.Namespace) -> int:
    import fsspec

    from data_pipelines.sources import DEFAULT_TEMPLATE, class_names, read_source
    from data_pipelines.write import NothingWritten, write_shards

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
    try:
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
    except NothingWritten:
        _print_skipped(skipped)
        raise
    with fsspec.open(posixpath.join(args.out, "sizes.json"), "rt") as f:
        written = sum(json.load(f).values())
    print(f"wrote {count(written, 'sample')} in {count(len(paths), 'shard')} to {args.out}")
    if names is not None:
        print(f"classes (cls 0..{len(names) - 1}): {json.dumps(names)}")
    _print_skipped(skipped)
    return 0


def _print_skipped(skipped: Sequence[Skipped]) -> None:
    if skipped:
        print(f"skipped {count(len(skipped), 'sample')}:")
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
        f"wrote {count(written.samples, 'sample')} in {count(written.shards, 'shard')} to "
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

    plain_local = "://" not in args.shards and not args.shards.startswith("pipe:")
    if plain_local and "{" not in args.shards and not os.path.exists(args.shards):
        raise FileNotFoundError(f"no shards match {args.shards!r}: no such folder or file")
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


def _sidecar_errors() -> tuple[type[Exception], ...]:
    from data_pipelines.sidecar import SidecarFormatError

    return (SidecarFormatError, FileNotFoundError)


def _shards_convert_sidecar(args: argparse.Namespace) -> int:
    from data_pipelines.sidecar import convert_sidecar

    rows = convert_sidecar(args.old, args.new)
    print(f"wrote {rows} rows of {args.old} to {args.new or args.old} in the sorted-key format")
    return 0


def _shards_inspect(args: argparse.Namespace) -> int:
    from data_pipelines.preview import describe, first_samples, write_grid

    previews = first_samples(args.shards, args.n, caption_key=args.caption_key)
    print(describe(previews))
    print(f"grid: {write_grid(previews, args.grid)}")
    return 0


def add_shards_command(commands: argparse._SubParsersAction) -> None:
    """Register `vlp shards write|validate|inspect|attach|convert-sidecar`."""
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
    write.add_argument(
        "--image-format",
        choices=("jpg", "png", "webp"),
        default="jpg",
        help="format of the stored images: a file in another one, or shrunk by --max-side, is "
        "re-encoded (default: jpg)",
    )
    write.add_argument(
        "--quality", type=positive_int, default=95, help="jpg/webp quality (default: 95)"
    )
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

    convert = sub.add_parser(
        "convert-sidecar",
        help="rewrite an old sidecar (one tensor per sample key) in the sorted-key format",
        description="Rewrites a sidecar written by an older `vlp prior weights` or `vlp protoclip "
        "teacher` (one safetensors tensor per sample key) as one sorted key array and one value "
        "array, which training reads in O(log N) per sample. Its id is kept, so a run started "
        "on the old file resumes on the converted one (convert in place for that).",
    )
    convert.add_argument("old", help="the old .safetensors sidecar")
    convert.add_argument(
        "new", nargs="?", help="where to write (default: OLD, replaced atomically)"
    )
    convert.set_defaults(func=_shards_convert_sidecar, user_errors=_sidecar_errors)

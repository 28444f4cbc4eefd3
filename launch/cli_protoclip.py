"""`vlp protoclip teacher`: ProtoCLIP's external teacher, precomputed before training."""

from __future__ import annotations

import argparse

from launch.caption_args import add_caption_source
from launch.cli_train import run_errors
from launch.evaluate import positive_int
from launch.failure import rank_and_world


def _protoclip_teacher(args: argparse.Namespace) -> int:
    """`vlp protoclip teacher`: the external teacher's embedding of every caption, by key."""
    from data_pipelines.sidecar import sidecar_metadata
    from launch.protoclip_teacher import write_teacher_sidecar

    model = {"model": args.model} if args.model else {}  # else the function's default
    out = write_teacher_sidecar(args.shards, args.out, dim=args.dim, text_key=args.text_key,
                                caption_field=args.caption_field, batch_size=args.batch_size,
                                pool=args.pool, **model)  # fmt: skip
    if rank_and_world()[0] == 0:  # once under `accelerate launch`
        samples = sidecar_metadata(out).get("samples", "?")
        print(f"wrote the teacher embeddings of {samples} samples to {out}; train with "
              f"objective.protoclip.teacher={out}")  # fmt: skip
    return 0


def add_protoclip_command(commands: argparse._SubParsersAction) -> None:
    """Register `vlp protoclip teacher`."""
    protoclip = commands.add_parser("protoclip", help="ProtoCLIP's external teacher")
    sub = protoclip.add_subparsers(dest="protoclip_command", required=True)
    teacher = sub.add_parser(
        "teacher",
        help="precompute the external teacher's text embeddings (objective.protoclip.teacher)",
        description="Embeds every caption with a frozen text model (last layer, mean-pooled as "
        "--pool says, L2-normalised), reduces them by PCA fitted on all samples to --dim (not "
        "renormalised), and writes one float32 [dim] row per sample key into one sidecar, a "
        "safetensors file (ProtoCLIP, arXiv 2206.10996, 'external teacher': RoBERTa-large, PCA "
        "to 64). Under `accelerate launch -m launch.cli protoclip teacher ...` the processes "
        "split the shards.",
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
    add_caption_source(teacher)
    teacher.add_argument(
        "--pool", choices=("all-positions", "tokens"), default="all-positions",
        help="all-positions (default, the official script's): ids padded with 0 to 77 "
        "positions, the mean over all of them, no mask; tokens: the mean over the real tokens",
    )  # fmt: skip
    teacher.add_argument(
        "--batch-size", type=positive_int, default=64, help="captions per forward (default: 64)"
    )
    teacher.set_defaults(func=_protoclip_teacher, user_errors=run_errors)

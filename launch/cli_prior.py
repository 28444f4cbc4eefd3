"""`vlp prior train-reference|weights`: PRIOR's reference LM, trained and read before `prior`."""

from __future__ import annotations

import argparse
from pathlib import Path

from launch.caption_args import add_caption_source
from launch.cli_train import run_errors, train_command

PRIOR_REFERENCE_RECIPE = Path(__file__).parent / "configs" / "prior_reference.yaml"


def _prior_train_reference(args: argparse.Namespace) -> int:
    """`vlp prior train-reference`: `vlp train` with the reference-LM recipe on these shards."""
    args.overrides = [f"data.train_shards={args.shards}", f"train.out_dir={args.out}",
                      *args.overrides]  # fmt: skip
    args.check, args.world_size = False, None
    return train_command(args)


def _prior_weights(args: argparse.Namespace) -> int:
    """`vlp prior weights`: log P_r of every caption, keyed by sample key."""
    from launch.prior_weights import write_reference_sidecar

    count = write_reference_sidecar(
        args.reference, args.shards, args.out, text_key=args.text_key,
        caption_field=args.caption_field, model=args.model, tokenizer_file=args.tokenizer,
    )  # fmt: skip
    print(f"wrote log P_r of {count} captions to {args.out}; train with "
          f"objective.prior.sidecar={args.out}")  # fmt: skip
    return 0


def add_prior_command(commands: argparse._SubParsersAction) -> None:
    """Register `vlp prior train-reference` and `vlp prior weights`."""
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
    reference.set_defaults(func=_prior_train_reference, user_errors=run_errors)
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
    add_caption_source(weights)
    weights.set_defaults(func=_prior_weights, user_errors=run_errors)

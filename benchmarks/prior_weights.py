"""PRIOR's premise, measured: does a text-only reference LM put more weight on image-related
words than on function words?

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/prior_weights.py [--steps 200]

Trains P_r with ``launch/configs/prior_reference_demo.yaml`` (the recipe's tokenizer,
``vlp:procedural-bpe``: every word one piece) on the procedural training captions, then computes
PRIOR's token weights ŵ_i = k·w_i/Σw, w_i = 1 − P_r(t_i | t_<i) (α = 1,
:func:`vlp.objectives.prior.weights.token_weights`) on the 1,000 held-out captions and averages
them per word class: colours, shapes, sizes, position words (what the image shows) against
function words, the scene words every image shares, punctuation and the end token. A weight
above 1 means PRIOR up-weights the word relative to plain captioning (mean 1 per caption).
Prints a table, writes ``benchmarks/results/prior_weights.json`` and the "PRIOR token weights"
section of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

import objectives  # noqa: E402

from data_pipelines.synthetic import CLASSNAMES, COLOURS, SIZES  # noqa: E402

RECIPE = objectives.CONFIGS / "prior_reference_demo.yaml"
WORDS = {
    "colour": set(COLOURS),
    "shape": {word for name in CLASSNAMES for word in name.split()},
    "size": set(SIZES),
    "position": {
        "top",
        "bottom",
        "left",
        "right",
        "middle",
        "center",
        "centre",
        "corner",
        "towards",
    },  # fmt: skip
    "function": {"a", "an", "the", "of", "on", "in", "at", "near", "is", "there", "one"},
    "scene": {"drawn", "dark", "noisy", "background"},
    "punctuation": {"(", ")", ","},
    "end of caption": {"</s>"},
}
"""Word class -> its words in the procedural captions."""
END = "</s>"
"""The end token's entry (PRIOR weighs it too: it is one of CoCa's caption labels)."""
HEADING = "## PRIOR token weights on the procedural captions"


def word_weights(reference_run: Path, captions: list[str]) -> dict[str, list[float]]:
    """Each word of ``captions`` (one piece each in the recipe's tokenizer), each punctuation
    mark and the end token -> the weights ŵ PRIOR gives it (α = 1)."""
    import yaml

    from vlp.models import create_model
    from vlp.objectives.prior.objective import PAD_ID, load_reference_run
    from vlp.objectives.prior.weights import reference_target_logprobs, token_weights

    model = yaml.safe_load(RECIPE.read_text())["model"]
    clip, _, _, tokenizer = create_model(model["name"], tokenizer=model["tokenizer"])
    lm = load_reference_run(reference_run, clip).eval()
    found: dict[str, list[float]] = {}
    for start in range(0, len(captions), 250):
        tokens = tokenizer(captions[start : start + 250])
        logprobs, mask = reference_target_logprobs(lm, tokens, PAD_ID)
        weights = token_weights(logprobs, mask, 1.0)
        for row, ids in enumerate(tokens[:, 1:].tolist()):
            for position, token in enumerate(ids):
                if mask[row, position]:
                    piece = tokenizer.processor.id_to_piece(token)
                    word = END if token == tokenizer.eos_id else piece.removeprefix("▁")
                    found.setdefault(word, []).append(float(weights[row, position]))
    return found


def by_class(found: dict[str, list[float]]) -> list[dict[str, object]]:
    """Mean weight, occurrences and words per word class."""
    rows: list[dict[str, object]] = []
    for name, words in WORDS.items():
        values = [v for word in sorted(words) for v in found.get(word, [])]
        rows.append({"class": name, "mean_weight": statistics.mean(values) if values else None,
                     "tokens": len(values), "words": sorted(w for w in words if w in found)})  # fmt: skip
    return rows


def markdown(rows: list[dict[str, object]], args: argparse.Namespace, loss: float) -> str:
    """The RESULTS.md section."""
    command = "HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/prior_weights.py"
    command += f" --steps {args.steps}" if args.steps != 200 else ""
    about = (
        f"P_r: the demo reference LM (2 layers, width 64, the 192-piece `vlp:procedural-bpe`), "
        f"{args.steps} steps of batch 64 on the procedural training captions (final loss "
        f"{loss:.2f}); weights ŵ (α = 1, mean 1 per caption) on the 1,000 held-out captions, "
        "averaged per word class. Above 1: PRIOR up-weights the word against plain captioning."
    )
    lines = [HEADING, "", textwrap.fill(about, 100), "",
             textwrap.fill(f"`{command}` — {datetime.date.today().isoformat()}, 2-core CPU, "
                           "`benchmarks/results/prior_weights.json`:", 100), "",
             "| word class | mean ŵ | tokens | words |", "|---|---:|---:|---|"]  # fmt: skip
    for row in rows:
        mean = row["mean_weight"]
        shown = "—" if mean is None else f"{mean:.3f}"
        words = ", ".join(row["words"])  # type: ignore[arg-type]
        lines.append(f"| {row['class']} | {shown} | {row['tokens']} | {words} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Train P_r, weigh the held-out captions, print and write the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "prior_weights")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--results-md", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from data_pipelines.synthetic import generate_samples
    from launch.demo import run_demo

    summary = run_demo(args.out, [f"train.steps={args.steps}", "train.checkpoint_every=0"], RECIPE)
    captions = [sample["txt"] for sample in generate_samples(1000, seed=1)]
    rows = by_class(word_weights(args.out, captions))
    section = markdown(rows, args, summary["final_train_loss"])
    print("\n" + section)
    args.results.mkdir(parents=True, exist_ok=True)
    report = {"steps": args.steps, "final_train_loss": summary["final_train_loss"], "rows": rows}
    (args.results / "prior_weights.json").write_text(json.dumps(report, indent=2) + "\n")
    objectives.write_section(args.results_md, section, HEADING)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The model card (``README.md``) that `vlp export` writes beside the weights.

It tells a reader who gets only the export folder what the weights are and how to use them: the
run's config highlights (model, objective, data, batch, steps, lr), the data seen (from the
checkpoint's ``trainer_state.json``), the eval results found in the run's ``results/*.json``
(CLIP_benchmark-shaped), and how to load the folder (open_clip and CLIP_benchmark, or
transformers) and to export the other format. The front matter is the Hugging Face hub's
(``library_name: open_clip`` or ``transformers``), so the folder can be uploaded as it is.

Example::

    text = model_card(info, "exports/demo", tokenizer={"tokenizer": "SimpleTokenizer"})
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # evals.loading imports torch; `vlp watch` reads results without it
    from evals.loading import ModelInfo

CARD_NAME = "README.md"

logger = logging.getLogger(__name__)


def run_dir_of(info: ModelInfo) -> Path | None:
    """The run directory a loaded checkpoint belongs to (``RUN/checkpoints/step_N``), if any."""
    if info.kind not in ("run", "checkpoint"):
        return None
    checkpoint = Path(info.pretrained)
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        logger.warning("model card: skipping '%s': %s", path, error)
        return None


def _read_config(path: Path) -> tuple[str, dict[str, Any]]:
    """A run's ``config.yaml``: its text and its parsed sections ("" and {} if unreadable)."""
    import yaml

    if not path.is_file():
        return "", {}
    try:
        text = path.read_text()
        loaded = yaml.safe_load(text)
    except (OSError, yaml.YAMLError) as error:
        logger.warning("model card: skipping '%s': %s", path, error)
        return "", {}
    return (text, loaded) if isinstance(loaded, dict) else ("", {})


def read_results(run_dir: Path) -> list[dict[str, Any]]:
    """The CLIP_benchmark-shaped results in ``run_dir/results`` (other JSON files are skipped)."""
    results = []
    for path in sorted((run_dir / "results").glob("*.json")):
        result = _read_json(path)
        if isinstance(result, dict) and {"dataset", "task"} <= set(result):
            if isinstance(result.get("metrics"), dict):
                results.append(result)
    return results


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return "nan" if math.isnan(value) else f"{value:.4g}"


def _table(rows: list[tuple[str, str]]) -> list[str]:
    return ["| | |", "|---|---|", *(f"| {key} | {value} |" for key, value in rows)]


def _highlights(config: dict[str, Any], state: dict[str, Any]) -> list[tuple[str, str]]:
    """(name, value) rows of what matters in a resolved ``config.yaml`` plus trainer state."""

    def get(section: str, key: str) -> Any:
        value = (config.get(section) or {}).get(key)
        return None if value in (None, "", [], {}) else value

    objective = get("objective", "name")
    if objective is not None and get("objective", "kwargs"):
        objective = f"{objective} {json.dumps(get('objective', 'kwargs'))}"
    batch = get("data", "batch_size")
    rows = [
        ("model", get("model", "name")),
        ("initialised from", get("model", "pretrained")),
        ("objective", objective),
        ("train shards", get("data", "train_shards") and f"`{get('data', 'train_shards')}`"),
        ("batch size per process", batch if batch is None else _number(batch)),
        ("processes", state.get("world_size")),
        ("global batch", state.get("global_batch") and _number(state["global_batch"])),
        ("optimizer steps (config)", get("train", "steps") and _number(get("train", "steps"))),
        ("learning rate", get("optim", "lr")),
        ("warmup steps", get("optim", "warmup_steps")),
        ("weight decay", get("optim", "weight_decay")),
        ("seed", get("train", "seed")),
    ]
    return [(name, str(value)) for name, value in rows if value is not None]


def _results_section(results: list[dict[str, Any]]) -> list[str]:
    if not results:
        return ["No eval results were found in the run's `results/` folder."]
    lines = ["| dataset | task | weights | metrics |", "|---|---|---|---|"]
    for result in results:
        metrics = ", ".join(f"{k} {_number(v)}" for k, v in result["metrics"].items())
        weights = Path(str(result.get("pretrained", ""))).name or "?"
        lines.append(f"| {result['dataset']} | {result['task']} | {weights} | {metrics} |")
    lines += ["", "Metrics are CLIP_benchmark's definitions; `nan` marks an undefined one "
              "(e.g. acc5 with fewer than 5 classes)."]  # fmt: skip
    return lines


def _usage_section(out: str, tokenizer: dict[str, str]) -> list[str]:
    lines = [
        "With open_clip:",
        "",
        "```python",
        "import open_clip",
        "",
        f'model, _, preprocess = open_clip.create_model_and_transforms("local-dir:{out}")',
        f'# or: model, preprocess = open_clip.create_model_from_pretrained("local-dir:{out}")',
        f'tokenizer = open_clip.get_tokenizer("local-dir:{out}")',
        "```",
        "",
        "With CLIP_benchmark (through vlp's NumPy-2.4-safe wrapper of its command line):",
        "",
        "```bash",
        "python -m evals.clip_benchmark_cli eval --model_type open_clip \\",
        f"    --model local-dir:{out} --pretrained none --dataset wds/NAME \\",
        "    --dataset_root path/to/wds_root --no_amp --output result.json",
        "```",
        "",
        f"With vlp: `vlp eval zeroshot --model {out} --dataset DATASET --out OUT`, or "
        f'`evals.loading.load_model("{out}")` in Python.',
        "",
        "With Hugging Face transformers: export the run again with `vlp export RUN OUT "
        "--format transformers` (a plain ViT CLIP with open_clip's text tower and tokenizer; "
        "other models are refused, naming why), then `CLIPModel.from_pretrained(OUT)`.",
    ]
    if tokenizer.get("tokenizer") == "sentencepiece":
        lines += [
            "",
            f"The tokenizer is SentencePiece (`{tokenizer.get('tokenizer_file')}`): vlp loads it; "
            "open_clip's `local-dir:` loader does not, and would use its default tokenizer.",
        ]
    return lines


def _transformers_usage_section(out: str) -> list[str]:
    return [
        "With Hugging Face transformers:",
        "",
        "```python",
        "from transformers import CLIPModel, CLIPProcessor",
        "",
        f'model = CLIPModel.from_pretrained("{out}")',
        f'processor = CLIPProcessor.from_pretrained("{out}", backend="pil")  # open_clip\'s resize',
        "```",
        "",
        '`backend="pil"` resizes as open_clip does (transformers\' default torchvision backend '
        "differs by ~1e-3 in the image embeddings); open_clip cleans text with ftfy and HTML "
        "unescaping before tokenising, transformers does not: clean such text first for equal ids.",
        "",
        "With open_clip, CLIP_benchmark or vlp: export the run again with `vlp export RUN OUT` "
        "(open_clip's hub layout, `local-dir:OUT`).",
    ]


def model_card(
    info: ModelInfo,
    out: str,
    tokenizer: dict[str, str],
    *,
    heads: bool = False,
    text_pool: str = "eot",
    export_format: str = "open_clip",
) -> str:
    """The Markdown card for an export of ``info`` into ``out`` (the name used to load it).

    ``tokenizer`` is the export config's tokenizer description (``{"tokenizer": ...}``);
    ``heads``: the export holds the objective's heads (``heads.safetensors``), which open_clip
    does not load; ``text_pool``: how the model's text embeddings are pooled (``max``:
    PyramidCLIP's, which open_clip does not know); ``export_format``: ``open_clip`` (hub
    layout) or ``transformers`` (a ``CLIPModel`` folder); the card says how to load it and how
    to get the other one.
    Whatever the run folder lacks (config, trainer state, results) is left out, not guessed.
    """
    run_dir = run_dir_of(info)
    config_text, config = _read_config(run_dir / "config.yaml") if run_dir else ("", {})
    state: dict[str, Any] = {}
    if info.kind in ("run", "checkpoint"):
        loaded = _read_json(Path(info.pretrained) / "trainer_state.json")
        state = loaded if isinstance(loaded, dict) else {}
    steps = state.get("step")
    transformers = export_format == "transformers"
    layout = (
        "as a Hugging Face transformers `CLIPModel` folder (`config.json` + `model.safetensors` "
        "+ processor and tokenizer files)"
        if transformers
        else "in open_clip's hub layout (`open_clip_config.json` + `open_clip_model.safetensors`)"
    )
    lines = [
        "---",
        f"library_name: {'transformers' if transformers else 'open_clip'}",
        "pipeline_tag: zero-shot-image-classification",
        "tags: [clip, vlp]",
        "---",
        "",
        f"# {info.name}" + (f", step {steps}" if steps is not None else ""),
        "",
        f"Exported by `vlp export` from `{info.pretrained}` {layout}.",
        "",
        "## Training",
        "",
    ]
    rows = [("weights", f"`{info.pretrained}`")]
    if steps is not None:
        rows.append(("steps trained", _number(steps)))
    if "samples_seen" in state:
        rows.append(("samples seen", _number(state["samples_seen"])))
    rows += _highlights(config, state)
    rows.append(("tokenizer", tokenizer.get("tokenizer", "?")))
    lines += _table(rows)
    if config_text:
        lines += ["", "<details><summary>The run's resolved config.yaml</summary>", "",
                  "```yaml", config_text.rstrip(), "```", "", "</details>"]  # fmt: skip
    lines += ["", "## Eval results", ""]
    lines += _results_section(read_results(run_dir) if run_dir else [])
    lines += ["", "## How to load", ""]
    lines += _transformers_usage_section(out) if transformers else _usage_section(out, tokenizer)
    if heads:
        lines += [
            "",
            "This model's objective trains heads on top of the towers (`heads.safetensors`): "
            "open_clip loads the bare towers, whose features are not the ones the objective "
            "trained; `vlp eval` and `evals.loading.load_model` apply the heads.",
        ]
    if text_pool == "max":
        lines += [
            "",
            "This model's text embeddings are the maximum over all token positions after the "
            "text tower's final LayerNorm, then projected (PyramidCLIP's `text_pool=max`): "
            "`vlp eval` and `evals.loading.load_model` pool so; open_clip loading this folder "
            "alone uses the end-of-text token, which the model was not trained with.",
        ]
    return "\n".join(lines) + "\n"

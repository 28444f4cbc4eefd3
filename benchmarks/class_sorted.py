"""Class-sorted shards: vlp's stream vs open_clip's own trainer, back to back (issue 10, fault 7).

A user measured, on a real 10-class folder written one class per shard, zero-shot acc1 0.36 for
vlp against 0.67 for ``open_clip_train`` (0.70 vs 0.68 on the same images shuffled): vlp's
stream took a batch from one shard at a time. No real folder is at hand here, so this is a proxy
on procedural images (``data_pipelines/synthetic.py``, 9 classes, 32 px):

1. a class folder ``FOLDER/<class>/<key>.png`` of ``--train-images`` images (seed 0);
2. ``vlp shards write FOLDER TRAIN --no-shuffle``: the class order is kept, so almost every
   1000-sample shard holds one class, and ``vlp shards validate TRAIN`` must warn about it;
3. held-out shards of ``--heldout-images`` images (seed 1), labelled with ``CLASSNAMES``;
4. on those same training shards, the same settings (``launch/configs/demo.yaml``: tiny ViT,
   batch 64, lr 1e-3, warmup 50, seed 0, 1 data worker; ``--steps`` steps each):
   (a) ``vlp train`` with the default ``data.shards_in_flight`` (8),
   (b) ``vlp train`` with ``data.shards_in_flight=1`` (the old stream: one shard per buffer),
   (c) ``python -m open_clip_train.main`` as webdataset (resampled) with the same model config,
       run through a wrapper (this file's ``openclip-peer`` command) that registers
       ``vlp-tiny-vit.json`` with ``open_clip.add_model_config`` before calling its ``main``;
5. every final model evaluated by the same code (``evals.loading.load_model`` +
   ``evals.heldout.HeldoutEvaluator``): zero-shot acc1 on the held-out shards with
   ``EVAL_TEMPLATES``.

open_clip's trainer needs pandas and ``webdataset<=0.2.86``, which vlp's environment does not
have (see the Makefile's ``.venv-openclip``); give it a Python that has them with
``--peer-python`` (default: ``.venv-openclip/bin/python`` when present, else this one) and/or
a folder prepended to its ``PYTHONPATH`` with ``--peer-path``. Arm (c) is skipped, and says why,
when ``import open_clip_train.main`` fails there.

Usage::

    .venv/bin/pip install --target /tmp/oc_overlay --no-deps pandas "webdataset<=0.2.86" \\
        pytz tzdata python-dateutil            # optional: open_clip_train's extra deps
    .venv/bin/python benchmarks/class_sorted.py --peer-path /tmp/oc_overlay

writes ``benchmarks/results/class_sorted.json`` and prints the table (``--results-md`` also
replaces this benchmark's section of ``benchmarks/RESULTS.md``).

Only the standard library is imported at module level: the ``openclip-peer`` command runs under
the peer's Python, where vlp's own webdataset is shadowed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = ROOT / "launch" / "configs" / "demo.yaml"
MODEL_CONFIG = ROOT / "vlp" / "models" / "model_configs" / "vlp-tiny-vit.json"
MODEL_NAME = "vlp-tiny-vit"
RESULTS_JSON = ROOT / "benchmarks" / "results" / "class_sorted.json"
RESULTS_MD = ROOT / "benchmarks" / "RESULTS.md"
SECTION = "## Class-sorted shards: vlp vs open_clip (procedural proxy)"
# The settings of launch/configs/demo.yaml that open_clip's trainer is given as flags.
BATCH, LR, WEIGHT_DECAY, WARMUP, GRAD_CLIP, SEED, WORKERS = 64, 1e-3, 0.1, 50, 1.0, 0, 1


def openclip_peer(argv: list[str]) -> None:
    """``openclip-peer MODEL_JSON ARGS...``: register MODEL_JSON with open_clip, then run
    ``open_clip_train.main.main(ARGS)`` (its ``--model`` accepts only registered names)."""
    import open_clip
    from open_clip_train.main import main

    open_clip.add_model_config(argv[0])
    main(argv[1:])


def write_class_folder(folder: Path, count: int, seed: int) -> None:
    """``folder/<class>/<key>.png``: ``count // 9`` procedural samples of each class (the first
    ones of the stream with ``seed``), so that class-ordered shards of ``count // 9`` samples
    hold one class each, like the user's 10 x 1000 folder. Reused when complete."""
    from data_pipelines.synthetic import CLASSNAMES, render_sample

    per_class = count // len(CLASSNAMES)
    if folder.is_dir() and sum(1 for _ in folder.glob("*/*.png")) == per_class * len(CLASSNAMES):
        return
    shutil.rmtree(folder, ignore_errors=True)
    left = dict.fromkeys(CLASSNAMES, per_class)
    index = 0
    while any(left.values()):
        sample = render_sample(index, seed=seed)
        name = sample["json"]["class"]
        if left[name]:
            left[name] -= 1
            target = folder / name / f"{sample['key']}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            sample["image"].save(target)
        index += 1


def vlp_cli(*args: str, capture: bool = False) -> subprocess.CompletedProcess[str]:
    """Run ``vlp ARGS`` (launch/cli.py) with this Python; raise if it fails."""
    command = [sys.executable, "-m", "launch.cli", *args]
    print("$ vlp " + shlex.join(args), flush=True)
    done = subprocess.run(command, cwd=ROOT, text=True, capture_output=capture, check=False)
    if done.returncode != 0:
        detail = (done.stderr or "")[-2000:] if capture else ""
        raise SystemExit(f"`vlp {shlex.join(args)}` exited {done.returncode}\n{detail}")
    return done


def write_data(work: Path, train_images: int, heldout_images: int) -> dict[str, Any]:
    """Training shards in class order (via the CLI) and held-out shards; the validate report."""
    from data_pipelines.synthetic import CLASSNAMES, generate_samples
    from data_pipelines.write import write_shards

    folder, train, heldout = work / "folder", work / "train", work / "heldout"
    write_class_folder(folder, train_images, seed=0)
    vlp_cli("shards", "write", str(folder), str(train), "--no-shuffle", "--overwrite")
    report = json.loads(vlp_cli("shards", "validate", str(train), "--json", capture=True).stdout)
    write_shards(
        generate_samples(heldout_images, seed=1),
        heldout,
        samples_per_shard=1000,
        overwrite=True,
        classnames=CLASSNAMES,
    )
    shards = sorted(train.glob("*.tar"))
    return {
        "folder": folder,
        "train": train,
        "heldout": heldout,
        "shards": shards,
        "warnings": report.get("warnings", []),
        "classes_per_shard": [s.get("classes") for s in report.get("shard_reports", [])],
    }


def train_vlp(data: dict[str, Any], out: Path, steps: int, shards_in_flight: int) -> float:
    """One vlp run on the class-sorted shards; returns its wall time in seconds."""
    from data_pipelines.synthetic import CLASSNAMES, EVAL_TEMPLATES

    started = time.perf_counter()
    vlp_cli(
        "train",
        "--config",
        str(DEMO_CONFIG),
        f"data.train_shards={data['train']}",
        f"data.shards_in_flight={shards_in_flight}",
        f"eval.zeroshot_shards={data['heldout']}",
        f"eval.classnames={json.dumps(CLASSNAMES)}",
        f"eval.templates={json.dumps(EVAL_TEMPLATES)}",
        f"train.steps={steps}",
        f"train.checkpoint_every={steps}",
        f"train.out_dir={out}",
        "train.overwrite=true",
        "train.report_to=[]",
    )
    return time.perf_counter() - started


def peer_env(peer_path: str | None) -> dict[str, str]:
    """The peer's environment: ``peer_path`` first on PYTHONPATH; one intra-op thread, as vlp
    picks for itself with one data worker on 2 cores (its log says so)."""
    env = dict(os.environ)
    if peer_path:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [peer_path, env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def peer_problem(python: str, env: dict[str, str]) -> str | None:
    """Why open_clip's trainer cannot run under ``python`` (None when it can)."""
    probe = "import open_clip_train.main, webdataset; print(webdataset.__version__)"
    done = subprocess.run(
        [python, "-c", probe], env=env, text=True, capture_output=True, check=False
    )
    if done.returncode == 0:
        return None
    return (done.stderr.strip().splitlines() or ["import failed"])[-1]


def train_openclip(
    data: dict[str, Any], out: Path, steps: int, python: str, env: dict[str, str]
) -> tuple[Path, float, list[str]]:
    """open_clip_train on the same shards; returns its final checkpoint, wall time and argv."""
    shards = data["shards"]
    urls = f"{data['train']}/{{{shards[0].stem}..{shards[-1].stem}}}.tar"
    shutil.rmtree(out, ignore_errors=True)
    args = [
        "--model", MODEL_NAME, "--train-data", urls, "--dataset-type", "webdataset",
        "--dataset-resampled", "--train-num-samples", str(steps * BATCH), "--epochs", "1",
        "--batch-size", str(BATCH), "--lr", str(LR), "--wd", str(WEIGHT_DECAY),
        "--warmup", str(WARMUP), "--grad-clip-norm", str(GRAD_CLIP), "--seed", str(SEED),
        "--workers", str(WORKERS), "--precision", "fp32", "--save-frequency", "1",
        "--logs", str(out.parent), "--name", out.name, "--log-every-n-steps", "50",
        "--report-to", "",
    ]  # fmt: skip
    command = [python, str(Path(__file__).resolve()), "openclip-peer", str(MODEL_CONFIG), *args]
    print("$ " + shlex.join(command[:1] + ["benchmarks/class_sorted.py", *command[2:]]))
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, check=False)
    seconds = time.perf_counter() - started
    checkpoint = out / "checkpoints" / "epoch_1.pt"
    if done.returncode != 0 or not checkpoint.is_file():
        raise SystemExit(f"open_clip_train exited {done.returncode}; no {checkpoint}")
    return checkpoint, seconds, args


def zeroshot_metrics(reference: str, pretrained: str | None, heldout: Path) -> dict[str, float]:
    """Zero-shot metrics of a model on the held-out shards, by vlp's evaluator."""
    from data_pipelines.synthetic import CLASSNAMES, EVAL_TEMPLATES
    from evals.datasets import load_labelled_shards
    from evals.heldout import HeldoutEvaluator
    from evals.loading import load_model

    model, preprocess, tokenizer, _ = load_model(reference, pretrained)
    urls = [str(p) for p in sorted(heldout.glob("*.tar"))]
    evaluator = HeldoutEvaluator(
        "heldout",
        load_labelled_shards(urls, preprocess),
        CLASSNAMES,
        EVAL_TEMPLATES,
        tokenizer,
        heldout,
        model_name=MODEL_NAME,
        batch_size=500,
    )
    metrics = evaluator(model, 0, write=False)
    return {k.removeprefix("eval/heldout/"): float(v) for k, v in metrics.items()}


def markdown(result: dict[str, Any]) -> str:
    """This benchmark's section of RESULTS.md."""
    rows = "\n".join(
        f"| {arm['label']} | {arm['acc1']:.3f} | {arm['mean_per_class_recall']:.3f} "
        f"| {arm['train_seconds']:.0f} |"
        if arm.get("acc1") is not None
        else f"| {arm['label']} | skipped: {arm['skipped']} | | |"
        for arm in result["arms"].values()
    )
    s = result["setup"]
    own = ", ".join(
        f"{arm['trainer_eval_acc1']:.3f} ({key})"
        for key, arm in result["arms"].items()
        if "trainer_eval_acc1" in arm
    )
    return f"""{SECTION}

{s["date"]}, {s["machine"]}. Command: `{s["command"]}` (open_clip_train's pandas and
`webdataset<=0.2.86` from an overlay: `.venv/bin/pip install --target /tmp/oc_overlay --no-deps
pandas "webdataset<=0.2.86" pytz tzdata python-dateutil`, so vlp's `.venv` is unchanged).

{s["train_images"]} procedural images (9 classes, 32 px; the first {s["train_images"] // 9} of each class in the
seed-0 stream, so that a shard of 1000 holds one class as in the user's 10 x 1000 folder) as a
class folder, written with `vlp shards write FOLDER OUT --no-shuffle` into {s["train_shards"]} shards in class
order (classes per shard: {s["classes_per_shard"]}); `vlp shards validate` warned: "{s["validate_warning"] or "(nothing)"}".

All arms train on those same shards, back to back, with demo.yaml's settings: `{MODEL_NAME}`, batch
{BATCH}, {s["steps"]} steps, lr {LR}, warmup {WARMUP}, weight decay {WEIGHT_DECAY}, seed {SEED}, one
data worker; shards sampled with replacement. Each final model is evaluated by the same code
(`evals.loading.load_model` + `HeldoutEvaluator`) on {s["heldout_images"]} held-out images (seed 1),
zero-shot with the synthetic `EVAL_TEMPLATES` (chance 0.111).

| arm | zero-shot acc1 | mean per-class recall | train s |
|---|---|---|---|
{rows}

(b) is the old stream (one shard in the sample buffer), (a) the default. The vlp runs' own
final evaluation gave acc1 {own}. open_clip_train ran with `OMP_NUM_THREADS=1`, the thread
count vlp chose for itself (2 cores, 1 data worker); its sample buffer holds 5000 (1000 filled
before the first sample leaves), so it starts from one shard and mixes about five later.

Folder captions are the default template `a photo of a {{c}}.`, one caption per class, so a batch
of one class holds one caption 64 times and gives the contrastive loss nothing to learn from.
This is a proxy for the user's real-folder measurement (10 classes, 10k images, 312 steps: vlp
0.36 vs open_clip 0.67 class-sorted; 0.70 vs 0.68 shuffled): procedural shapes, not photos, and
one seed. Image augmentation is each trainer's own (both RandomResizedCrop scale 0.9–1).
"""


def write_section(text: str) -> None:
    """Replace this benchmark's section of RESULTS.md (or append it); others are left as is."""
    content = RESULTS_MD.read_text()
    start = content.find(SECTION)
    if start < 0:
        content = content.rstrip("\n") + "\n\n" + text
    else:
        following = re.search(r"^## ", content[start + len(SECTION) :], re.MULTILINE)
        end = start + len(SECTION) + following.start() if following else len(content)
        content = content[:start] + text + ("\n" if following else "") + content[end:]
    RESULTS_MD.write_text(content)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["openclip-peer"]:
        openclip_peer(argv[1:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="runs/class_sorted", help="data and run folders")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps of every arm")
    parser.add_argument("--train-images", type=int, default=9000)
    parser.add_argument("--heldout-images", type=int, default=1000)
    default_peer = ROOT / ".venv-openclip" / "bin" / "python"
    parser.add_argument(
        "--peer-python",
        default=str(default_peer) if default_peer.exists() else sys.executable,
        help="Python for open_clip_train (default: .venv-openclip's if built, else this one)",
    )
    parser.add_argument("--peer-path", help="folder put first on the peer's PYTHONPATH")
    parser.add_argument("--arms", default="a,b,c", help="which arms to run (a,b,c)")
    parser.add_argument("--results-md", action="store_true", help="update RESULTS.md's section")
    opts = parser.parse_args(argv)

    work = (ROOT / opts.work).resolve()
    started = time.perf_counter()
    data = write_data(work, opts.train_images, opts.heldout_images)
    print(f"data ready in {time.perf_counter() - started:.0f} s; validate: {data['warnings']}")
    arms: dict[str, dict[str, Any]] = {}
    for arm, flight in (("a", 8), ("b", 1)):
        if arm in opts.arms:
            out = work / f"vlp_in_flight_{flight}"
            seconds = train_vlp(data, out, opts.steps, flight)
            label = f"({arm}) vlp, data.shards_in_flight={flight}" + (
                " (default)" if flight == 8 else " (old stream)"
            )
            arms[arm] = {"label": label, "train_seconds": seconds, "model": str(out)}
            arms[arm].update(zeroshot_metrics(str(out), None, data["heldout"]))
            own = json.loads((out / "results" / "heldout_zeroshot_classification.json").read_text())
            arms[arm]["trainer_eval_acc1"] = own["metrics"]["acc1"]  # the run's own final eval
    if "c" in opts.arms:
        label = "(c) open_clip_train (webdataset, resampled)"
        env = peer_env(opts.peer_path)
        problem = peer_problem(opts.peer_python, env)
        if problem is not None:
            print(f"open_clip_train cannot run under {opts.peer_python}: {problem}; skipped")
            arms["c"] = {"label": label, "skipped": problem}
        else:
            checkpoint, seconds, args = train_openclip(
                data, work / "open_clip", opts.steps, opts.peer_python, env
            )
            arms["c"] = {"label": label, "train_seconds": seconds, "model": str(checkpoint)}
            arms["c"]["open_clip_args"] = args
            arms["c"].update(zeroshot_metrics(MODEL_NAME, str(checkpoint), data["heldout"]))

    command = "python benchmarks/class_sorted.py " + shlex.join(argv)
    result = {
        "setup": {
            "date": datetime.date.today().isoformat(),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared), CPU only",
            "command": command.strip(),
            "steps": opts.steps,
            "train_images": opts.train_images,
            "heldout_images": opts.heldout_images,
            "train_shards": len(data["shards"]),
            "classes_per_shard": data["classes_per_shard"],
            "validate_warning": " ".join(data["warnings"]),
            "total_seconds": time.perf_counter() - started,
        },
        "arms": arms,
    }
    RESULTS_JSON.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_JSON.write_text(json.dumps(result, indent=2) + "\n")
    section = markdown(result)
    print("\n" + section)
    if opts.results_md:
        write_section(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())

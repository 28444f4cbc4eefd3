"""The ProtoCLIP objective and its episodes: the model call, the schedule, the frozen phases, the
episode driver's two passes, clustering over 2 processes, and exact resume inside an episode."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from data_pipelines.synthetic import generate_samples
from data_pipelines.write import write_shards
from launch.run import train
from tests.ddp_helpers import run_on_ranks
from tests.objectives.protoclip_reference import back_translated, protoclip_terms_reference
from tests.seeds import extra_seeds
from vlp.config import load_config
from vlp.models import create_model
from vlp.objectives import create_objective
from vlp.objectives.episodic import EPISODE_INDEX, PASS_ONE
from vlp.objectives.protoclip import nearest_centroids
from vlp.training.device_batches import DeviceBatches
from vlp.training.episodes import EpisodeDriver, EpisodePlan, episode_plan
from vlp.training.optim import create_optimizer

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "launch" / "configs" / "protoclip_demo.yaml"


def _objective(**settings: object):  # type: ignore[no-untyped-def]
    values = {"episode_size": 32, "k": 4, "hidden": 16, "dim": 8, "backend": "torch"}
    return create_objective("protoclip", **(values | settings))


def _model(objective):  # type: ignore[no-untyped-def]
    clip, _, _, tokenizer = create_model("vlp-tiny-vit")
    return objective.build_model(clip), tokenizer


def _inputs(tokenizer, b: int = 4) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    return {
        "image": torch.randn(b, 3, 32, 32),
        "text": tokenizer([f"a photo {i}" for i in range(b)]),
    }


def test_encode_returns_clip_features_and_projections_and_pass_one_only_projections():
    objective = _objective()
    model, tokenizer = _model(objective)
    outputs = model(_inputs(tokenizer))
    assert set(outputs) == set(objective.outputs)
    assert outputs["image_projected"].shape == (4, 8)
    assert torch.allclose(outputs["image_projected"].norm(dim=1), torch.ones(4))
    assert torch.allclose(outputs["image_features"].norm(dim=1), torch.ones(4))
    assert float(outputs["proto_scale"].detach()) == pytest.approx(1 / 0.07)
    # The CLIP side is the un-projected embedding, the same that evals use.
    plain = model.clip.encode_image(_inputs(tokenizer)["image"], normalize=True)
    assert torch.allclose(outputs["image_features"], plain, atol=1e-6)
    only = model({**_inputs(tokenizer), PASS_ONE: True})
    assert set(only) == {"image_projected", "text_projected"}


def test_the_image_head_starts_as_a_copy_of_the_text_head_unless_independent():
    """As the official code's deep copy: equal weights, separate parameters (they train apart);
    ``head_init=independent`` draws each head on its own."""
    from types import SimpleNamespace

    clip = SimpleNamespace(visual=SimpleNamespace(output_dim=12))
    heads = _objective().heads(clip)
    image, text = heads["proto_image"].state_dict(), heads["proto_text"].state_dict()
    assert image.keys() == text.keys()
    assert all(torch.equal(image[k], text[k]) for k in text)
    shared = {id(p) for p in heads["proto_image"].parameters()}
    assert shared.isdisjoint(id(p) for p in heads["proto_text"].parameters())
    apart = _objective(head_init="independent").heads(clip)
    first = apart["proto_image"].net[0].weight
    assert not torch.equal(first, apart["proto_text"].net[0].weight)
    with pytest.raises(ValueError, match="head_init must be one of"):
        _objective(head_init="shared")


def test_the_image_towers_lr_reaches_zero_where_lit_starts_the_rest_at_the_end():
    """As the official code: 5 episodes of 4 steps, the last 2 LiT: the image tower's groups
    (and only its parameters) follow a cosine that reaches 0 at step 12, the rest of the
    model's at step 20; ``image_lr_end=end`` keeps one schedule (and two groups)."""
    from vlp.config import OptimConfig
    from vlp.training.optim import create_scheduler, names_in

    objective = _objective(lit_episodes=2)
    model, _ = _model(objective)
    end = objective.image_lr_end(4, 5)
    assert end == 12 and _objective(image_lr_end="end").image_lr_end(4, 5) is None
    assert _objective(lit_episodes=0).image_lr_end(4, 5) is None
    config = OptimConfig(lr=0.1, warmup_steps=2)
    apart = names_in(model, model.clip.visual)
    optimizer = create_optimizer(model, config, objective.no_decay(model), apart=apart)
    scheduler = create_scheduler(optimizer, config, 20, end)
    image = {id(p) for p in model.clip.visual.parameters()}
    for group in optimizer.param_groups:
        assert all((id(p) in image) == group["apart"] for p in group["params"])
    lrs = []
    for _ in range(20):
        lrs.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    lrs.append([group["lr"] for group in optimizer.param_groups])
    apart_flags = [group["apart"] for group in optimizer.param_groups]
    for step, values in enumerate(lrs):
        for own, lr in zip(apart_flags, values, strict=True):
            assert (lr == 0.0) == (step >= (12 if own else 20)), (step, own, lr)
    assert len(create_optimizer(model, config, objective.no_decay(model)).param_groups) == 2


def test_heads_are_not_named_image_or_text_and_get_no_weight_decay():
    objective = _objective()
    model, _ = _model(objective)
    assert sorted(model.heads) == ["proto_image", "proto_scale", "proto_text"]
    from vlp.config import OptimConfig

    optimizer = create_optimizer(model, OptimConfig(weight_decay=0.5), objective.no_decay(model))
    decayed = {id(p) for p in optimizer.param_groups[0]["params"]}
    for name, param in model.named_parameters():
        if name.startswith("heads."):
            assert id(param) not in decayed, name
    assert any(id(p) in decayed for p in model.clip.visual.parameters())


@pytest.mark.parametrize(
    ("episodes", "clip_episodes", "lit", "expected"),
    [
        (6, 1, 2, ["clip", "proto", "proto", "proto", "lit", "lit"]),
        (4, 0, 0, ["proto"] * 4),
        (3, 1, 2, ["clip", "lit", "lit"]),
    ],
)
def test_schedule_clip_first_lit_last(episodes, clip_episodes, lit, expected):
    objective = _objective(clip_episodes=clip_episodes, lit_episodes=lit)
    assert [objective.phase_of(e, episodes) for e in range(episodes)] == expected
    assert [objective.needs_features(e, episodes) for e in range(episodes)] == [
        phase != "lit" for phase in expected
    ]


def _step_grads(objective, phase: str):  # type: ignore[no-untyped-def]
    model, tokenizer = _model(objective)
    objective.phase = phase
    inputs = _inputs(tokenizer)
    outputs = model(inputs)
    parts = objective(outputs, {**inputs, EPISODE_INDEX: torch.arange(4)})
    sum(v for k, v in parts.items() if k.endswith("_loss")).backward()
    objective.before_optimizer_step(model)
    return model, parts


@pytest.mark.parametrize("phase", ["clip", "lit"])
def test_clip_only_phases_keep_heads_in_the_graph_then_drop_their_gradients(phase):
    model, parts = _step_grads(_objective(), phase)
    idle = float(parts["proto_idle_loss"].detach())
    assert idle == 0.0 and math.copysign(1.0, idle) == 1.0  # logged as 0, not -0
    assert all(p.grad is None for p in model.heads.parameters())
    visual_grads = [p.grad for p in model.clip.visual.parameters()]
    assert all(g is None for g in visual_grads) == (phase == "lit")
    assert all(p.grad is not None for p in model.clip.transformer.parameters())


def _features(n: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(4, 8, generator=generator), dim=1)
    rows = centres[torch.arange(n) % 4] + 0.01 * torch.randn(n, 8, generator=generator)
    return {"image": rows, "text": rows.roll(1, dims=1), "teacher": rows[:, :6]}


def _three_partitions(n: int = 32) -> dict[str, torch.Tensor]:
    """Tight blobs around 4 unit centres per modality, each modality partitioning the rows
    differently: image row i in blob i % 4, text row i in (i // 2) % 4, teacher row i in
    i // (n / 4); so a term that reads another modality's labels, or the batch position for
    the episode row, gets other clusters."""
    generator = torch.Generator().manual_seed(5)
    rows = torch.arange(n)

    def blobs(blob: torch.Tensor, d: int) -> torch.Tensor:
        centres = torch.nn.functional.normalize(torch.randn(4, d, generator=generator), dim=1)
        return centres[blob] + 0.01 * torch.randn(n, d, generator=generator)

    return {
        "image": blobs(rows % 4, 8),
        "text": blobs((rows // 2) % 4, 8),
        "teacher": blobs(rows // (n // 4), 6),
    }


def test_each_phase_is_logged_by_name_when_it_begins(caplog: pytest.LogCaptureFixture) -> None:
    objective = _objective()
    caplog.set_level(logging.INFO, logger="vlp.objectives.protoclip.objective")
    for episode in range(5):
        objective.begin_episode(episode, 5, None)
    assert [r.getMessage() for r in caplog.records] == [
        "ProtoCLIP episode 0 of 5: phase 'clip' (episode/phase=0): CLIP alone (clustering "
        "still runs) from here on",
        "ProtoCLIP episode 1 of 5: phase 'proto' (episode/phase=1): CLIP and the prototype "
        "terms from here on",
        "ProtoCLIP episode 3 of 5: phase 'lit' (episode/phase=2): CLIP alone with the image "
        "tower frozen (LiT) from here on",
    ]


def test_begin_episode_clusters_and_prototype_terms_use_the_episode_rows():
    """k-means finds each modality's blobs (centroids = their members' means), and the terms of
    a batch whose samples are episode rows 3, 17, 30, 9 equal the plain float64 reference
    (``protoclip_reference.py``: PBT means, soft and hard targets, cross-entropies, weights ½)
    computed from the episode's features, those labels and centroids, and the model's outputs."""
    objective = _objective(teacher="teacher.safetensors")
    features = _three_partitions()
    logs = objective.begin_episode(1, 4, features)
    assert objective.phase == "proto" and float(logs["empty_clusters"]) == 0
    prototypes = objective.prototypes
    assert prototypes is not None and prototypes.external is not None
    labels = {
        "image": prototypes.image_labels.tolist(),
        "text": prototypes.text_labels.tolist(),
        "teacher": prototypes.external.labels.tolist(),
    }
    rows = range(32)
    truth = {"image": [i % 4 for i in rows], "text": [(i // 2) % 4 for i in rows],
             "teacher": [i // 8 for i in rows]}  # fmt: skip
    for name, found in labels.items():  # the same partition, up to the clusters' numbering
        assert len(set(zip(found, truth[name], strict=True))) == len(set(found)) == 4, name
        torch.testing.assert_close(
            objective.centroids[name].double(), back_translated(features[name], found, 4)
        )

    model, tokenizer = _model(objective)
    inputs = _inputs(tokenizer)
    outputs = model(inputs)
    batch_rows = [3, 17, 30, 9]
    parts = objective(outputs, {**inputs, EPISODE_INDEX: torch.tensor(batch_rows)})
    expected = protoclip_terms_reference(
        image_projected=outputs["image_projected"],
        text_projected=outputs["text_projected"],
        rows=batch_rows,
        image_features=features["image"],
        text_features=features["text"],
        image_labels=labels["image"],
        text_labels=labels["text"],
        image_centroids=objective.centroids["image"],
        text_centroids=objective.centroids["text"],
        external_labels=labels["teacher"],
        scale=outputs["proto_scale"].double(),
        temperature=0.01,  # the paper's τ_t, the default
    )
    assert expected.pop("empty") == 0
    assert set(expected) == {"proto_i2t_loss", "proto_t2i_loss", "proto_i2e_loss", "proto_t2e_loss"}
    for key, value in expected.items():
        assert isinstance(value, torch.Tensor) and value > 0
        torch.testing.assert_close(parts[key].double(), value, rtol=1e-5, atol=1e-6, msg=key)


def test_cluster_every_reuses_the_last_centroids_between_clusterings():
    objective = _objective(cluster_every=2)
    objective.begin_episode(2, 8, _features(seed=0))
    kept = {k: v.clone() for k, v in objective.centroids.items()}
    logs = objective.begin_episode(3, 8, _features(seed=1))
    assert float(logs["reclustered"]) == 0.0
    assert all(torch.equal(kept[k], objective.centroids[k]) for k in kept)
    new = _features(seed=1)["image"]
    assert torch.equal(objective.prototypes.image_labels, nearest_centroids(new, kept["image"]))
    assert float(objective.begin_episode(4, 8, _features(seed=2))["reclustered"]) == 1.0


def test_episode_state_round_trips_without_reclustering():
    objective = _objective(teacher="teacher.safetensors")
    objective.begin_episode(1, 4, _features())
    state = objective.episode_state()
    other = _objective(teacher="teacher.safetensors")
    other.load_episode_state(1, 4, state)
    assert other.phase == "proto"
    for key, value in other.episode_state().items():
        assert torch.equal(value, state[key]), key


def test_episode_plan_drops_the_incomplete_last_batch():
    """As the official loop: the recipe's 200,000-sample episode at 8 processes x 64 is 390
    steps (it was refused, asking for 199,680 or 200,192); below one step is an error."""
    assert episode_plan(64, 16, 10) == EpisodePlan(steps_per_episode=4, episodes=3)
    assert episode_plan(50, 16, 10) == EpisodePlan(steps_per_episode=3, episodes=4)
    assert episode_plan(200_000, 8 * 64, 156_250).steps_per_episode == 390
    assert episode_plan(200_000, 64, 312_500) == EpisodePlan(3125, 100)
    with pytest.raises(ValueError, match="less than one step of the global batch 16.*at least 16"):
        episode_plan(15, 16, 10)


class _Stream:
    """A resumable stream of numbered batches (state: the next number)."""

    def __init__(self) -> None:
        self.next = 0

    def __iter__(self):  # type: ignore[no-untyped-def]
        while True:
            n = self.next
            self.next += 1
            yield {"__key__": [f"{n}-{i}" for i in range(2)], "image": torch.full((2, 1), float(n))}

    def state_dict(self) -> dict[str, int]:
        return {"next": self.next}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.next = state["next"]


class _Probe(torch.nn.Module):
    def forward(self, inputs):  # type: ignore[no-untyped-def]
        return {"x": inputs["image"]}


class _Episodic:
    """Records what the driver hands over."""

    def __init__(self) -> None:
        self.features = None

    def model_inputs(self, batch):  # type: ignore[no-untyped-def]
        return {"image": batch["image"]}

    def needs_features(self, episode: int, episodes: int) -> bool:
        return True

    def episode_features(self, outputs, batch):  # type: ignore[no-untyped-def]
        return {"x": outputs["x"]}

    def begin_episode(self, episode, episodes, features):  # type: ignore[no-untyped-def]
        self.features = features
        return {}


def _driver(objective, accum: int = 2) -> EpisodeDriver:  # type: ignore[no-untyped-def]
    plan = episode_plan(8, 2 * accum, 6)
    return EpisodeDriver(objective, plan, rank=0, world_size=1, batch_size=2, accum_steps=accum)


def test_pass_one_reads_the_episode_then_pass_two_replays_the_same_samples():
    stream, objective = _Stream(), _Episodic()
    feed = DeviceBatches(stream, 2, torch.device("cpu"), ["image"], None)
    feed.next(0)  # batches 0 and 1: the step before the episode
    driver = _driver(objective)
    _, stopped = driver.pass_one(_Probe(), feed, 2, _null, lambda: False)
    assert not stopped
    assert objective.features["x"].flatten().tolist() == [2, 2, 3, 3, 4, 4, 5, 5]
    micro = feed.next(2)
    assert [int(b["image"][0]) for b in micro] == [2, 3]
    driver.label(micro)
    assert [b[EPISODE_INDEX].tolist() for b in micro] == [[0, 1], [2, 3]]
    assert not driver.due()
    micro = feed.next(3)  # a step skipped for a non-finite loss still used these samples
    driver.label(micro)
    assert [b[EPISODE_INDEX].tolist() for b in micro] == [[4, 5], [6, 7]]
    assert driver.due()  # the episode's samples are used up, whatever the step count says


def _null():  # type: ignore[no-untyped-def]
    import contextlib

    return contextlib.nullcontext()


def test_a_stop_during_pass_one_rewinds_to_the_episode_start():
    stream, objective = _Stream(), _Episodic()
    feed = DeviceBatches(stream, 2, torch.device("cpu"), ["image"], None)
    _, stopped = _driver(objective).pass_one(_Probe(), feed, 0, _null, lambda: True)
    assert stopped and objective.features is None
    assert stream.state_dict() == {"next": 0}
    assert [int(b["image"][0]) for b in feed.next(0)] == [0, 1]


def _gathered_labels(rank: int, world: int, k: int) -> list[int]:
    from vlp.distributed import all_gather

    rows = _features(64)["image"]
    mine = rows.view(world, -1, rows.shape[1])[rank]  # rank r holds rows [r·n/R, (r+1)·n/R)
    gathered = torch.cat(all_gather(mine))
    objective = _objective(k=k, episode_size=64)
    objective.begin_episode(1, 4, {"image": gathered, "text": gathered})
    return objective.prototypes.image_labels.tolist()


@pytest.mark.slow
def test_two_processes_cluster_the_gathered_features_as_one_process_the_concatenation():
    one = _gathered_labels(0, 1, 4)
    two = run_on_ranks(_gathered_labels, 2, 4)
    assert two[0] == two[1] == one


def _clustering_on_every_rank(rank: int, world: int, seconds: float) -> dict[str, object]:
    """Two episodes (k-means, then reuse: ``cluster_every=2``) on the same gathered features,
    with each k-means made ``seconds`` slower; what every rank computed itself, what it holds
    after the broadcasts, and the longest any broadcast of the episode kept it waiting."""
    import time

    import torch.distributed as dist

    from vlp.objectives.protoclip import objective as module

    real_kmeans, real_broadcast = module.kmeans, module.broadcast_
    own: list[torch.Tensor] = []
    waits: list[float] = []

    def slow_kmeans(*args: Any, **kwargs: Any) -> Any:
        time.sleep(seconds)  # a slow device at the paper's M and K
        result = real_kmeans(*args, **kwargs)
        own.extend([result.labels.clone(), result.centroids.clone()])
        return result

    def timed_broadcast(tensor: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        out = real_broadcast(tensor)
        waits.append(time.perf_counter() - start)
        return out

    module.kmeans, module.broadcast_ = slow_kmeans, timed_broadcast  # type: ignore[assignment]
    objective = _objective(k=4, episode_size=64, cluster_every=2)
    dist.barrier()  # the ranks reach the episode together, as after pass 1's all-gather
    objective.begin_episode(2, 8, _features(64, seed=0))
    held = [objective.prototypes.image_labels, objective.prototypes.text_labels,
            objective.centroids["image"], objective.centroids["text"]]  # fmt: skip
    objective.begin_episode(3, 8, _features(64, seed=1))  # assigned to the kept centroids
    held += [objective.prototypes.image_labels, objective.prototypes.text_labels]
    return {"own": own, "held": held, "longest_wait": max(waits)}


@pytest.mark.slow
def test_every_rank_clusters_so_no_rank_waits_for_the_main_process():
    """Before: the main process clustered while rank 1 waited inside the broadcast for all of
    it, which at the paper's M = 200,000 and K = 20,000 can pass the collective timeout. Now
    each rank clusters the same features with the same seed (bitwise the same result on the
    CPU), the broadcast waits only for the difference, and every rank holds what one process
    holds."""
    seconds = 2.0
    ranks = run_on_ranks(_clustering_on_every_rank, 2, seconds)
    one = _objective(k=4, episode_size=64, cluster_every=2)
    one.begin_episode(2, 8, _features(64, seed=0))
    expected = [one.prototypes.image_labels, one.prototypes.text_labels,
                one.centroids["image"], one.centroids["text"]]  # fmt: skip
    one.begin_episode(3, 8, _features(64, seed=1))
    expected += [one.prototypes.image_labels, one.prototypes.text_labels]
    for result in ranks:
        assert len(result["own"]) == 6  # image, text, teacher: labels and centroids each
        assert result["longest_wait"] < seconds / 2, result["longest_wait"]
        assert all(torch.equal(a, b) for a, b in zip(result["held"], expected, strict=True))
    mine, theirs = ranks[0]["own"], ranks[1]["own"]
    assert all(torch.equal(a, b) for a, b in zip(mine, theirs, strict=True))


def _config(shards: Path, out: Path, **extra: object):  # type: ignore[no-untyped-def]
    values = {
        "data.train_shards": shards,
        "data.batch_size": 8,
        "data.workers": 1,
        "data.shuffle_buffer": 20,
        "train.steps": 16,
        "train.log_every": 1,
        "train.checkpoint_every": 1,
        "train.keep_checkpoints": 20,
        "train.out_dir": out,
        "optim.warmup_steps": 1,
        "objective.protoclip.episode_size": 32,
        "objective.protoclip.k": 4,
        "objective.protoclip.hidden": 32,
        "objective.protoclip.lit_episodes": 1,
        "objective.protoclip.backend": "torch",
        "eval.every": 0,
        **extra,
    }
    return load_config(RECIPE, [f"{k}={v}" for k, v in values.items()])


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slowest
@pytest.mark.parametrize("seed", extra_seeds(0, 1))
def test_resume_inside_and_between_episodes_equals_the_uninterrupted_run_bitwise(tmp_path, seed):
    """16 steps in 4 episodes of 4 (CLIP, prototypes, prototypes, LiT): resuming at steps 5 and
    6 (pass 2 of a prototype episode: no re-clustering) and at step 8 (before an episode's pass
    1) ends with the same weights, bit for bit, and the same losses at every step."""
    shards = tmp_path / "shards"
    write_shards(generate_samples(48, seed=seed), shards, samples_per_shard=12)
    whole = tmp_path / "whole"
    train(_config(shards, whole, **{"train.seed": seed}))
    assert any("train/proto_i2t_loss" in r for r in _records(whole))
    for resume_at in (5, 6, 8):
        out = tmp_path / f"from_{resume_at}"
        checkpoint = whole / "checkpoints" / f"step_{resume_at:08d}"
        # only the final checkpoint: its writes cost more than the steps (96 MB each)
        resumed = {"train.seed": seed, "train.resume": checkpoint, "train.checkpoint_every": 0}
        train(_config(shards, out, **resumed))
        records = _assert_resumed_run_equals(whole, out, resume_at, last=16)
        episodes = [r["step"] for r in records if "episode/index" in r]
        assert episodes == [s for s in (8, 12) if s >= resume_at]  # no re-clustering mid-episode


def _assert_resumed_run_equals(whole: Path, out: Path, resume_at: int, last: int) -> list[dict]:
    """The run in ``out``, resumed at ``resume_at``, logged the losses of the uninterrupted run
    in ``whole`` at every later step and ends at step ``last`` with the same weights (CLIP and
    heads), bit for bit; returns its records."""
    expected = {r["step"]: r["train/loss"] for r in _records(whole) if "train/loss" in r}
    records = _records(out)
    got = {r["step"]: r["train/loss"] for r in records if "train/loss" in r}
    assert got == {s: expected[s] for s in range(resume_at + 1, last + 1)}
    step = f"step_{last:08d}"
    for name in ("model.safetensors", "heads.safetensors"):
        mine = load_file(str(out / "checkpoints" / step / name))
        theirs = load_file(str(whole / "checkpoints" / step / name))
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs), (resume_at, name)
    return records


@pytest.mark.slow
@pytest.mark.parametrize("lit_episodes", [1, 3])
def test_a_checkpoint_of_the_first_episode_resumes_bitwise(tmp_path, lit_episodes):
    """3 episodes of 1 step (CLIP, prototypes, LiT; or LiT only): the checkpoint after step 1 has
    no optimizer state for the heads (their gradients were dropped) nor, when that step was a
    LiT step, for the image tower. The resume gives them none either, as the uninterrupted run
    has at that point, and ends with the same losses and weights bit for bit."""
    shards = tmp_path / "shards"
    write_shards(generate_samples(16, seed=0), shards, samples_per_shard=8)
    settings = {
        "train.steps": 3,
        "objective.protoclip.episode_size": 8,
        "objective.protoclip.k": 2,
        "objective.protoclip.lit_episodes": lit_episodes,
    }
    train(_config(shards, tmp_path / "whole", **settings))
    checkpoint = tmp_path / "whole" / "checkpoints" / "step_00000001"
    resume = {"train.resume": checkpoint, "train.checkpoint_every": 0}
    train(_config(shards, tmp_path / "resumed", **(settings | resume)))
    _assert_resumed_run_equals(tmp_path / "whole", tmp_path / "resumed", resume_at=1, last=3)


@pytest.mark.slow
def test_a_checkpoint_with_one_schedule_resumes_only_with_one_schedule(tmp_path):
    """``image_lr_end=lit`` gives the image tower optimizer groups of its own (4, not 2): a
    checkpoint written with ``end`` is refused in one line naming the setting, and resumes with
    it."""
    from launch.build import StartupError

    shards = tmp_path / "shards"
    write_shards(generate_samples(16, seed=0), shards, samples_per_shard=8)
    # 3 episodes of 1 step: CLIP, prototypes, LiT (checkpoint after the prototype step, where
    # every parameter has optimizer state)
    one = {"train.steps": 3, "objective.protoclip.episode_size": 8, "objective.protoclip.k": 2}
    end = {**one, "objective.protoclip.image_lr_end": "end"}
    train(_config(shards, tmp_path / "first", **end))
    checkpoint = tmp_path / "first" / "checkpoints" / "step_00000002"
    resume = {"train.resume": checkpoint, "train.checkpoint_every": 0}
    with pytest.raises(
        StartupError, match="has 2 optimizer parameter groups, this run 4.*image_lr_end=end"
    ):
        train(_config(shards, tmp_path / "lit", **(one | resume)))
    train(_config(shards, tmp_path / "same", **(end | resume)))


def test_the_demo_recipe_is_valid():
    config = load_config(RECIPE)
    objective = create_objective("protoclip", config.objective.section())
    assert objective.episode_samples() % config.data.batch_size == 0


def test_training_samples_without_a_teacher_embedding_stop_the_run_at_start_up(tmp_path):
    """Counted over every shard, not only the first sample: the message gives how many and
    the command that writes the teacher embeddings."""
    from data_pipelines.sidecar import write_sidecar
    from launch.build import StartupError

    shards = tmp_path / "shards"
    samples = list(generate_samples(24, seed=0))
    write_shards(iter(samples), shards, samples_per_shard=8)
    teacher = tmp_path / "teacher.safetensors"
    keep = [s["key"] for s in samples if s["key"] != samples[13]["key"]][:20]  # 4 missing
    write_sidecar(teacher, {key: torch.zeros(4) for key in keep})
    config = _config(shards, tmp_path / "run", **{"objective.protoclip.teacher": teacher})
    with pytest.raises(StartupError) as error:
        train(config)
    message = str(error.value)
    assert "4 of 24 training samples have no entry in sidecar 'teacher'" in message
    assert f"vlp protoclip teacher {shards} --out {teacher}" in message
    assert samples[13]["key"] in message


@pytest.mark.slow
def test_an_external_teacher_adds_its_terms_through_the_stream(tmp_path):
    """The teacher's embeddings come per sample key from the sidecar, are clustered with the
    same k, and give the I→E and T→E terms."""
    from data_pipelines.sidecar import write_sidecar

    shards = tmp_path / "shards"
    samples = list(generate_samples(32, seed=0))
    write_shards(iter(samples), shards, samples_per_shard=16)
    teacher = tmp_path / "teacher.safetensors"
    generator = torch.Generator().manual_seed(0)
    write_sidecar(teacher, {s["key"]: torch.randn(6, generator=generator) for s in samples})
    out = tmp_path / "run"
    extra = {"objective.protoclip.teacher": teacher, "train.steps": 12, "train.checkpoint_every": 0}
    train(_config(shards, out, **extra))
    steps = {r["step"]: r for r in _records(out) if "train/loss" in r}
    assert "train/proto_i2e_loss" in steps[5] and "train/proto_t2e_loss" in steps[5]
    state = load_file(str(out / "checkpoints" / "step_00000012" / "episode.safetensors"))
    assert state["centroids.teacher"].shape == (4, 6)


def test_a_run_too_short_for_a_prototype_episode_says_so(caplog):
    objective = _objective(clip_episodes=1, lit_episodes=2)
    with caplog.at_level("WARNING"):
        objective.begin_episode(0, 3, _features())
    assert "none with the prototype terms" in caplog.text

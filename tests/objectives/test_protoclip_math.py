"""ProtoCLIP's math: k-means (torch and faiss), Prototypical Back Translation, soft targets, the
prototype losses against hand-written float64 references (forward and backward), the heads and
their weight-decay exclusions."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.objectives.protoclip_reference import protoclip_terms_reference, soft_cross_entropy
from vlp.objectives.protoclip import (
    EpisodePrototypes,
    KMeansResult,
    ProjectionHead,
    TermWeights,
    episode_prototypes,
    kmeans,
    no_decay_parameter_names,
    pbt_centroids,
    protoclip_terms,
    prototype_loss,
    soft_targets,
)

# ---------------------------------------------------------------------------------- k-means


def blobs(k: int, per_blob: int, d: int, seed: int, spread: float = 0.05):
    """``k`` well-separated Gaussian blobs (centres ~N(0, 1)·4, std ``spread``) and their ids."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g) * 4
    truth = torch.arange(k).repeat_interleave(per_blob)
    points = centres[truth] + spread * torch.randn(k * per_blob, d, generator=g)
    order = torch.randperm(k * per_blob, generator=g)
    return points[order], truth[order], centres


def same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Label vectors equal up to a renaming of the clusters (a bijection between label sets)."""
    pairs = {(int(x), int(y)) for x, y in zip(a, b, strict=True)}
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("k, d", [(3, 2), (8, 16), (12, 5)])
def test_torch_kmeans_recovers_separable_blobs(seed, k, d):
    points, truth, centres = blobs(k, 30, d, seed)
    result = kmeans(points, k, backend="torch", seed=seed)
    assert result.labels.dtype == torch.long and result.labels.shape == (len(points),)
    assert result.centroids.shape == (k, d)
    assert same_partition(result.labels, truth)
    # each found centroid is its blob's centre, up to the blob's sampling noise
    for cluster in range(k):
        blob = truth[result.labels == cluster][0]
        torch.testing.assert_close(result.centroids[cluster], centres[blob], atol=0.05, rtol=0)


def test_torch_kmeans_inertia_is_that_of_the_nearest_centroid_labels():
    points, _, _ = blobs(6, 20, 4, seed=1, spread=1.5)  # overlapping: a real optimisation
    result = kmeans(points, 6, backend="torch")
    distances = torch.cdist(points, result.centroids).pow(2)
    assert torch.equal(result.labels, distances.argmin(1))
    assert result.inertia == pytest.approx(distances.min(1).values.sum().item(), rel=1e-5)


def test_torch_kmeans_is_deterministic_and_keeps_the_best_restart():
    points, _, _ = blobs(7, 25, 3, seed=2, spread=1.5)
    first = kmeans(points, 7, backend="torch", seed=11)
    again = kmeans(points, 7, backend="torch", seed=11)
    assert torch.equal(first.labels, again.labels)
    assert torch.equal(first.centroids, again.centroids)
    assert first.inertia == again.inertia
    # restart r is seeded with seed + r: three restarts = the best of three single runs
    singles = [kmeans(points, 7, backend="torch", seed=s, restarts=1) for s in (11, 12, 13)]
    assert first.inertia == min(single.inertia for single in singles)


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 10_000])
def test_torch_kmeans_does_not_depend_on_the_chunk_size(chunk_size):
    points, _, _ = blobs(5, 20, 6, seed=3, spread=0.5)
    reference = kmeans(points.double(), 5, backend="torch", chunk_size=100)
    result = kmeans(points.double(), 5, backend="torch", chunk_size=chunk_size)
    assert torch.equal(result.labels, reference.labels)
    torch.testing.assert_close(result.centroids, reference.centroids, rtol=0, atol=1e-12)
    assert result.centroids.dtype == torch.float64


def test_torch_kmeans_with_more_clusters_than_distinct_points():
    """Duplicates force empty clusters, which are re-seeded; every point sits on a centroid."""
    points = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]).repeat(4, 1)
    result = kmeans(points, 5, backend="torch", iterations=5)
    assert result.inertia == 0.0
    torch.testing.assert_close(result.centroids[result.labels], points)


def test_kmeans_rejects_bad_arguments():
    points = torch.randn(10, 3)
    with pytest.raises(ValueError, match="k must be in"):
        kmeans(points, 11, backend="torch")
    with pytest.raises(ValueError, match="backend"):
        kmeans(points, 2, backend="sklearn")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="NaN"):
        kmeans(torch.full((10, 3), math.nan), 2, backend="torch")
    with pytest.raises(ValueError, match=r"\[n, d\]"):
        kmeans(torch.randn(10), 2, backend="torch")


@pytest.mark.parametrize("seed", range(3))
def test_faiss_and_torch_agree_on_separable_blobs(seed):
    pytest.importorskip("faiss")
    points, truth, _ = blobs(6, 40, 8, seed)
    faiss_result = kmeans(points, 6, backend="faiss", seed=seed)
    torch_result = kmeans(points, 6, backend="torch", seed=seed)
    auto_result = kmeans(points, 6, backend="auto", seed=seed)
    assert isinstance(faiss_result, KMeansResult)
    assert same_partition(faiss_result.labels, torch_result.labels)
    assert same_partition(faiss_result.labels, truth)
    assert torch.equal(auto_result.labels, faiss_result.labels)  # auto = faiss when it imports
    assert faiss_result.inertia == pytest.approx(torch_result.inertia, rel=1e-5)
    distances = torch.cdist(points, faiss_result.centroids).pow(2)
    assert torch.equal(faiss_result.labels, distances.argmin(1))


# ------------------------------------------------------------------------- PBT and targets


def test_pbt_centroids_by_hand_with_an_empty_cluster():
    student = torch.tensor([[1.0, 2.0], [3.0, 4.0], [-1.0, 0.5], [5.0, -2.0], [0.0, 1.0]])
    teacher_labels = torch.tensor([2, 0, 2, 0, 2])  # cluster 1 and 3 are empty
    centroids, empty = pbt_centroids(student, teacher_labels, 4)
    expected = torch.tensor(
        [
            [(3.0 + 5.0) / 2, (4.0 - 2.0) / 2],  # rows 1, 3
            [0.0, 0.0],
            [(1.0 - 1.0 + 0.0) / 3, (2.0 + 0.5 + 1.0) / 3],  # rows 0, 2, 4; not re-normalised
            [0.0, 0.0],
        ]
    )
    torch.testing.assert_close(centroids, expected, rtol=0, atol=1e-7)
    assert empty == 2


def test_pbt_centroids_rejects_labels_out_of_range():
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        pbt_centroids(torch.randn(4, 2), torch.tensor([0, 1, 3, 0]), 3)


def test_soft_targets_by_hand():
    centroids = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, -1.0]], dtype=torch.float64)
    labels = torch.tensor([0, 2])
    tau = 0.5
    q = soft_targets(centroids, labels, tau)
    # row 0: C0·C = (1, 0.6, 0); row 1: C2·C = (0, -0.8, 1)
    for row, dots in enumerate([(1.0, 0.6, 0.0), (0.0, -0.8, 1.0)]):
        exps = [math.exp(v / tau) for v in dots]
        expected = torch.tensor([e / sum(exps) for e in exps], dtype=torch.float64)
        torch.testing.assert_close(q[row], expected, rtol=1e-14, atol=0)


@pytest.mark.parametrize("tau", [0.01, 0.1, 1.0])
def test_soft_target_rows_are_distributions_peaked_at_the_label(tau):
    centroids = F.normalize(torch.randn(9, 5, generator=torch.Generator().manual_seed(0)), dim=1)
    labels = torch.tensor([0, 3, 8, 3])
    q = soft_targets(centroids, labels, tau)
    torch.testing.assert_close(q.sum(1), torch.ones(4))
    assert torch.equal(q.argmax(1), labels)  # a unit centroid is closest to itself


@pytest.mark.parametrize("tau", [0.0, -1.0])
def test_non_positive_temperature_gives_one_hot_targets(tau):
    q = soft_targets(torch.randn(5, 3), torch.tensor([4, 0, 2]), tau)
    assert torch.equal(q, torch.eye(5)[[4, 0, 2]])


# --------------------------------------------------------------------------------- losses


def episode(n=12, k=4, d=6, external=True, seed=0):
    """A small float64 episode: ``(raw, prototypes)``. ``raw`` holds what the prototypes are
    made from (unit features, k-means labels as lists with text cluster k-1 left empty, k-means
    centroids, external labels or None), named as :func:`protoclip_terms_reference` takes them;
    ``prototypes`` is :func:`episode_prototypes` of the same."""
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    text = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    image_labels = torch.randint(k, (n,), generator=g)
    text_labels = torch.randint(k - 1, (n,), generator=g)  # text cluster k-1 stays empty
    # the k-means centroids are an input here (k-means is tested above): any rows will do, and
    # rows unlike the back-translated means tell the soft targets' centroids from the students'
    image_centroids = 0.9 * F.normalize(torch.randn(k, d, generator=g, dtype=torch.float64), dim=1)
    text_centroids = 0.9 * F.normalize(torch.randn(k, d, generator=g, dtype=torch.float64), dim=1)
    external_labels = torch.randint(k, (n,), generator=g) if external else None
    raw = {
        "image_features": image,
        "text_features": text,
        "image_labels": image_labels.tolist(),
        "text_labels": text_labels.tolist(),
        "image_centroids": image_centroids,
        "text_centroids": text_centroids,
        "external_labels": None if external_labels is None else external_labels.tolist(),
    }
    prototypes = episode_prototypes(
        image,
        text,
        KMeansResult(image_labels, image_centroids, 0.0),
        KMeansResult(text_labels, text_centroids, 0.0),
        external_labels,
    )
    return raw, prototypes


@pytest.mark.parametrize("tau", [0.01, 0.2, -1.0])
@pytest.mark.parametrize("b, k, d", [(1, 3, 2), (5, 4, 6), (8, 7, 3)])
def test_prototype_loss_matches_reference_forward_and_backward(tau, b, k, d):
    g = torch.Generator().manual_seed(b * 100 + k)
    features = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=1)
    centroids = torch.randn(k, d, generator=g, dtype=torch.float64) * 0.5
    teacher = torch.randn(k, d, generator=g, dtype=torch.float64)
    targets = soft_targets(teacher, torch.randint(k, (b,), generator=g), tau)
    scale = torch.tensor(1 / 0.07, dtype=torch.float64)
    inputs = [t.clone().requires_grad_() for t in (features, centroids, scale)]
    ref_inputs = [t.clone().requires_grad_() for t in (features, centroids, scale)]
    ours = prototype_loss(inputs[0], inputs[1], targets, inputs[2])
    reference = soft_cross_entropy(ref_inputs[0], ref_inputs[1], targets, ref_inputs[2])
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)
    for grad, ref_grad in zip(
        torch.autograd.grad(ours, inputs),
        torch.autograd.grad(reference, ref_inputs),
        strict=True,
    ):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)


def test_prototype_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="targets"):
        prototype_loss(torch.randn(3, 4), torch.randn(5, 4), torch.randn(3, 4), torch.tensor(1.0))


def test_episode_prototypes_back_translate_and_count_empty_clusters():
    raw, prototypes = episode()
    assert isinstance(prototypes, EpisodePrototypes) and prototypes.external is not None
    image, text = raw["image_features"], raw["text_features"]
    k = raw["image_centroids"].shape[0]
    for student, labels, translated in [
        (image, raw["text_labels"], prototypes.image_from_text),
        (text, raw["image_labels"], prototypes.text_from_image),
        (image, raw["external_labels"], prototypes.external.image_from_external),
        (text, raw["external_labels"], prototypes.external.text_from_external),
    ]:
        for j in range(k):
            members = [i for i in range(len(labels)) if labels[i] == j]
            expected = student[members].mean(0) if members else torch.zeros(student.shape[1])
            torch.testing.assert_close(translated[j], expected.to(translated.dtype))

    def missing(name: str) -> int:
        return k - len(set(raw[name]))

    empties = missing("text_labels") + missing("image_labels") + 2 * missing("external_labels")
    assert prototypes.empty == empties >= 1


@pytest.mark.parametrize("tau", [0.05, 0.5, 0.0])
@pytest.mark.parametrize("external", [True, False])
def test_protoclip_terms_use_the_papers_mapping(external, tau):
    """Each weighted term, forward and backward, against the plain float64 reference
    (``protoclip_reference.py``) computed from the episode's raw features, labels and k-means
    centroids, not from the implementation's PBT centroids or targets: I→T scores images
    against the image means of the text clusters with soft targets from the text centroids and
    the text labels of the batch's episode rows, T→I mirrored, I→E / T→E hard external labels
    against each modality's means over the external clusters."""
    raw, prototypes = episode(external=external, seed=1)
    index = torch.tensor([3, 0, 7, 7, 11])  # episode rows, out of order and repeated
    z_i = F.normalize(raw["image_features"][index] + 0.1, dim=1).requires_grad_()
    z_t = F.normalize(raw["text_features"][index] - 0.1, dim=1).requires_grad_()
    scale = torch.tensor(14.0, dtype=torch.float64, requires_grad=True)
    weights = TermWeights(i2t=0.3, t2i=0.7, i2e=1.5, t2e=0.25)
    terms = protoclip_terms(z_i, z_t, index, prototypes, scale, tau, weights)

    expected = protoclip_terms_reference(
        image_projected=z_i,
        text_projected=z_t,
        rows=index.tolist(),
        scale=scale,
        temperature=tau,
        weights=(0.3, 0.7, 1.5, 0.25),
        **raw,
    )
    empty = expected.pop("empty")
    assert set(terms) == {*expected, "proto_empty_clusters"}
    assert terms["proto_empty_clusters"].item() == empty >= 1
    for key, reference in expected.items():
        assert isinstance(reference, torch.Tensor)
        torch.testing.assert_close(terms[key], reference, rtol=1e-12, atol=1e-12)
        ours_grad = torch.autograd.grad(terms[key], (z_i, z_t, scale), allow_unused=True)
        ref_grad = torch.autograd.grad(reference, (z_i, z_t, scale), allow_unused=True)
        for ours, ref in zip(ours_grad, ref_grad, strict=True):
            assert (ours is None) == (ref is None)
            if ours is not None:
                torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)


def test_protoclip_terms_default_weights_are_the_papers_halves():
    raw, prototypes = episode(seed=2)
    index = torch.arange(6)
    image, text = raw["image_features"][index], raw["text_features"][index]
    scale = torch.tensor(1 / 0.07, dtype=torch.float64)
    default = protoclip_terms(image, text, index, prototypes, scale)
    ones = TermWeights(1.0, 1.0, 1.0, 1.0)
    unweighted = protoclip_terms(image, text, index, prototypes, scale, 0.01, ones)
    for key in ("proto_i2t_loss", "proto_t2i_loss", "proto_i2e_loss", "proto_t2e_loss"):
        torch.testing.assert_close(default[key], 0.5 * unweighted[key])


# ---------------------------------------------------------------------------------- heads


@pytest.mark.parametrize("train", [True, False])
def test_projection_head_outputs_unit_vectors_of_out_dim(train):
    head = ProjectionHead(32, hidden=64, out_dim=16).train(train)
    out = head(torch.randn(5, 32))
    assert out.shape == (5, 16)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(5))
    assert [type(m) for m in head.net] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]


def test_projection_head_defaults_are_the_papers():
    head = ProjectionHead(512)
    assert head.net[0].out_features == 2048 and head.net[3].out_features == 128
    with pytest.raises(ValueError, match="out_dim"):
        ProjectionHead(512, out_dim=0)


def test_no_decay_names_are_heads_norms_biases_and_scales():
    model = nn.Module()
    model.trunk = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 4, bias=False))
    model.heads = nn.ModuleDict({"image": ProjectionHead(4, 6, 3), "text": ProjectionHead(4, 6, 3)})
    model.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    model.prototype_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    names = no_decay_parameter_names(model)
    every = {name for name, _ in model.named_parameters()}
    decayed = every - names
    assert decayed == {"trunk.0.weight", "trunk.2.weight"}
    assert names <= every  # usable as-is against model.named_parameters()
    assert {"heads.image.net.0.weight", "heads.text.net.3.weight", "prototype_scale"} <= names

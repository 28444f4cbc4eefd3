"""ProtoCLIP's prototype terms written out from the paper and the official code (REFERENCES.md,
"ProtoCLIP"), in float64 with plain loops, for tests to compare the implementation against.

Nothing here calls :mod:`vlp.objectives.protoclip`: the expected values must not come from the
helpers under test. For an episode of n samples with k-means labels y^I, y^T (and external
labels y^E) and k-means centroids C^I, C^T:

- Prototypical Back Translation: the student centroid of teacher cluster j is the plain mean of
  the STUDENT modality's episode features over the samples the teacher put in j (not
  re-normalised; an empty cluster is a zero row).
- Soft target of a sample with teacher label y: q_j = softmax_j(⟨C_T[y], C_T[j]⟩ / τ_t); τ_t <= 0
  gives one-hot. The external teacher's targets are always one-hot.
- Loss of one term: mean over the batch of −Σ_j q_ij log softmax_j(s_p · ⟨z_i, c_j⟩).
- I→T: image projections against the image means over the TEXT clusters, targets from the text
  centroids and text labels; T→I mirrored; I→E / T→E: each modality's means over the external
  clusters, one-hot external labels. L = w_proto·½(I→T + T→I) + w_ext·½(I→E + T→E).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def back_translated(student: Tensor, teacher_labels: Sequence[int], k: int) -> Tensor:
    """``[k, d]`` float64: row j is the mean of ``student``'s rows whose teacher label is j."""
    rows = []
    for j in range(k):
        members = [student[i].double() for i, label in enumerate(teacher_labels) if label == j]
        if members:
            rows.append(sum(members[1:], members[0]) / len(members))
        else:
            rows.append(torch.zeros(student.shape[1], dtype=torch.float64))
    return torch.stack(rows)


def empty_clusters(teacher_labels: Sequence[int], k: int) -> int:
    """How many of the k clusters hold no sample."""
    return sum(1 for j in range(k) if j not in set(teacher_labels))


def one_hot(label: int, k: int) -> list[float]:
    """A hard target: all weight on cluster ``label``."""
    return [1.0 if j == label else 0.0 for j in range(k)]


def target_distribution(centroids: Tensor, label: int, temperature: float) -> list[float]:
    """The teacher's target over k clusters for one sample of cluster ``label``."""
    k = centroids.shape[0]
    if temperature <= 0:
        return one_hot(label, k)
    own = [float(v) for v in centroids[label]]
    dots = [sum(a * float(b) for a, b in zip(own, centroids[j], strict=True)) for j in range(k)]
    top = max(dots)
    exps = [math.exp((v - top) / temperature) for v in dots]
    return [e / sum(exps) for e in exps]


def soft_cross_entropy(
    features: Tensor, centroids: Tensor, targets: Sequence[Sequence[float]], scale: Tensor
) -> Tensor:
    """Σ_i −Σ_j q_ij log softmax_j(s · ⟨z_i, c_j⟩) / b, loop by loop (differentiable in
    ``features`` and ``scale``)."""
    total = features.new_zeros((), dtype=torch.float64)
    for i in range(features.shape[0]):
        logits = torch.stack([scale * (features[i].double() * c).sum() for c in centroids])
        top = logits.max().detach()
        log_norm = top + torch.log(torch.exp(logits - top).sum())
        total = total - sum(q * (logits[j] - log_norm) for j, q in enumerate(targets[i]))
    return total / features.shape[0]


def protoclip_terms_reference(
    *,
    image_projected: Tensor,
    text_projected: Tensor,
    rows: Sequence[int],
    image_features: Tensor,
    text_features: Tensor,
    image_labels: Sequence[int],
    text_labels: Sequence[int],
    image_centroids: Tensor,
    text_centroids: Tensor,
    external_labels: Sequence[int] | None,
    scale: Tensor,
    temperature: float,
    weights: tuple[float, float, float, float] = (0.5, 0.5, 0.5, 0.5),
) -> dict[str, Tensor | int]:
    """The weighted terms (``proto_i2t_loss`` … ``proto_t2e_loss``) of a batch whose sample b
    is episode row ``rows[b]``, from the episode's raw features, labels and centroids; and
    ``empty``, the empty clusters summed over the back translations."""
    k = image_centroids.shape[0]
    w_i2t, w_t2i, w_i2e, w_t2e = weights
    image_centroids, text_centroids = image_centroids.double(), text_centroids.double()
    i2t_targets = [target_distribution(text_centroids, text_labels[r], temperature) for r in rows]
    t2i_targets = [target_distribution(image_centroids, image_labels[r], temperature) for r in rows]
    image_from_text = back_translated(image_features, text_labels, k)
    text_from_image = back_translated(text_features, image_labels, k)
    terms: dict[str, Tensor | int] = {
        "proto_i2t_loss": w_i2t
        * soft_cross_entropy(image_projected, image_from_text, i2t_targets, scale),
        "proto_t2i_loss": w_t2i
        * soft_cross_entropy(text_projected, text_from_image, t2i_targets, scale),
    }
    empty = empty_clusters(text_labels, k) + empty_clusters(image_labels, k)
    if external_labels is not None:
        hard = [one_hot(external_labels[r], k) for r in rows]
        image_from_external = back_translated(image_features, external_labels, k)
        text_from_external = back_translated(text_features, external_labels, k)
        terms["proto_i2e_loss"] = w_i2e * soft_cross_entropy(
            image_projected, image_from_external, hard, scale
        )
        terms["proto_t2e_loss"] = w_t2e * soft_cross_entropy(
            text_projected, text_from_external, hard, scale
        )
        empty += 2 * empty_clusters(external_labels, k)
    terms["empty"] = empty
    return terms

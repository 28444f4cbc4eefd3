"""ProtoCLIP's prototype-level discrimination and Prototypical Back Translation (Chen et al.,
"Prototypical Contrastive Language Image Pretraining", arXiv 2206.10996: the method sections
"prototype-level discrimination", "Prototypical Back Translation" and "external teacher";
official code megvii-research/protoclip, ``src/training/loss.py`` ``ProtoLoss``,
``clustering.py`` ``PBT``, ``train.py``).

Per episode (no gradient; ``episode_prototypes``): k-means labels and centroids of the image and
the text projections (:mod:`vlp.objectives.protoclip.kmeans`), and their back translations.
Per batch (``protoclip_terms``), for L2-normalised projections z^I, z^T and the learned
prototype scale s_p, four cross-entropies between a student's logits and a teacher's targets:

=========  ========================  ================================  =====================
term       student logits            student centroids (PBT)           targets
=========  ========================  ================================  =====================
I→T        s_p · z^I · Cᵀ            image means over TEXT clusters    soft, text centroids
T→I        s_p · z^T · Cᵀ            text means over IMAGE clusters    soft, image centroids
I→E        s_p · z^I · Cᵀ            image means over EXTERNAL         hard external labels
T→E        s_p · z^T · Cᵀ            text means over EXTERNAL          hard external labels
=========  ========================  ================================  =====================

Soft targets q = softmax(C_T[y] · C_Tᵀ / τ_t) with the teacher's own centroids C_T and label y
(τ_t = 0.01; τ_t <= 0: one-hot). The loss is
w_proto·½(L_I→T + L_T→I) + w_ext·½(L_I→E + L_T→E), all w = 1 in the paper and the code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from vlp.objectives.protoclip.kmeans import KMeansResult


def pbt_centroids(student: Tensor, teacher_labels: Tensor, k: int) -> tuple[Tensor, int]:
    """Prototypical Back Translation: centroid j is the mean of the STUDENT modality's features
    over the samples the teacher put in cluster j, so the student is scored against prototypes
    in its own space (grouping decoupled from the modality gap).

    Like the official code the means are not re-normalised, and a cluster the teacher left empty
    stays a zero row (its logit is then 0); the number of such rows is returned.

    Args:
        student: ``[n, d]`` the episode's student features (image or text projections).
        teacher_labels: ``long [n]`` the teacher's cluster of each sample, in ``[0, k)``.
        k: number of teacher clusters.

    Returns:
        ``([k, d]`` centroids in the student's dtype, the number of empty clusters).
    """
    if student.ndim != 2 or teacher_labels.shape != student.shape[:1]:
        raise ValueError(
            f"pbt_centroids: student [n, d] and teacher_labels [n] expected, got "
            f"{tuple(student.shape)} and {tuple(teacher_labels.shape)}"
        )
    low, high = (int(teacher_labels.min()), int(teacher_labels.max())) if len(student) else (0, 0)
    if low < 0 or high >= k:
        raise ValueError(f"pbt_centroids: teacher_labels must lie in [0, {k}), got [{low}, {high}]")
    counts = torch.bincount(teacher_labels, minlength=k)
    sums = student.new_zeros(k, student.shape[1]).index_add_(0, teacher_labels, student)
    centroids = sums / counts.clamp_min(1).unsqueeze(1).to(student.dtype)
    return centroids, int((counts == 0).sum())


def hard_targets(labels: Tensor, k: int, dtype: torch.dtype) -> Tensor:
    """One-hot ``[b, k]`` targets: the external teacher's, and soft targets with τ_t <= 0."""
    return F.one_hot(labels, k).to(dtype)


def soft_targets(centroids_teacher: Tensor, labels: Tensor, temperature: float) -> Tensor:
    """The teacher's target distribution q = softmax(C_T[y] · C_Tᵀ / τ_t), ``[b, k]``: a sample
    of teacher cluster y also gives weight to the clusters whose centroids lie near C_T[y].

    Args:
        centroids_teacher: ``[k, d]`` the teacher modality's k-means centroids.
        labels: ``long [b]`` the teacher's cluster of each batch sample.
        temperature: τ_t (the paper's 0.01); ``<= 0`` gives one-hot hard labels.
    """
    k = centroids_teacher.shape[0]
    if temperature <= 0:
        return hard_targets(labels, k, centroids_teacher.dtype)
    return torch.softmax(centroids_teacher[labels] @ centroids_teacher.T / temperature, dim=1)


def prototype_loss(features: Tensor, centroids: Tensor, targets: Tensor, scale: Tensor) -> Tensor:
    """Cross-entropy between softmax(scale · features · centroidsᵀ) and ``targets``, the mean
    over the batch (the official ``ProtoLoss``).

    Args:
        features: ``[b, d]`` L2-normalised student projections.
        centroids: ``[k, d]`` the prototypes the student is scored against (PBT centroids).
        targets: ``[b, k]`` target distributions (rows sum to 1).
        scale: 0-dim learned prototype scale s_p = exp(log s_p) (init 1/0.07, at most 100).
    """
    if features.shape[1] != centroids.shape[1] or targets.shape != (
        features.shape[0],
        centroids.shape[0],
    ):
        raise ValueError(
            f"prototype_loss: features [b, d], centroids [k, d], targets [b, k] expected, got "
            f"{tuple(features.shape)}, {tuple(centroids.shape)}, {tuple(targets.shape)}"
        )
    return F.cross_entropy(scale * features @ centroids.T, targets)


@dataclass(frozen=True)
class ExternalPrototypes:
    """The external teacher's episode clustering, translated into both towers' spaces.

    Attributes:
        labels: ``long [n]`` k-means labels of the teacher's features (the paper: RoBERTa-large,
            PCA to 64-d), with the same k as the towers' clusterings.
        image_from_external: ``[k, d]`` image means over the external clusters (I→E student).
        text_from_external: ``[k, d]`` text means over the external clusters (T→E student).
    """

    labels: Tensor
    image_from_external: Tensor
    text_from_external: Tensor


@dataclass(frozen=True)
class EpisodePrototypes:
    """Everything the prototype terms need from one episode, indexed by episode row.

    Attributes:
        image_labels, text_labels: ``long [n]`` k-means labels of each tower's projections.
        image_centroids, text_centroids: ``[k, d]`` k-means centroids (the soft targets).
        image_from_text: ``[k, d]`` image means over the text clusters (I→T student).
        text_from_image: ``[k, d]`` text means over the image clusters (T→I student).
        external: the external teacher's part, or None without one.
        empty: empty clusters summed over all back translations (2, or 4 with ``external``).
    """

    image_labels: Tensor
    text_labels: Tensor
    image_centroids: Tensor
    text_centroids: Tensor
    image_from_text: Tensor
    text_from_image: Tensor
    external: ExternalPrototypes | None
    empty: int


def episode_prototypes(
    image_features: Tensor,
    text_features: Tensor,
    image_clusters: KMeansResult,
    text_clusters: KMeansResult,
    external_labels: Tensor | None = None,
) -> EpisodePrototypes:
    """Back-translate one episode's clusterings (the official ``Clustering.PBT`` calls).

    Args:
        image_features, text_features: ``[n, d]`` the episode's projections (no gradient).
        image_clusters, text_clusters: k-means of those features, with the same k.
        external_labels: ``long [n]`` the external teacher's k-means labels, or None.
    """
    k = image_clusters.centroids.shape[0]
    if text_clusters.centroids.shape[0] != k:
        raise ValueError(
            f"episode_prototypes: image and text clusterings need the same k, got {k} and "
            f"{text_clusters.centroids.shape[0]}"
        )
    image_from_text, empty_i = pbt_centroids(image_features, text_clusters.labels, k)
    text_from_image, empty_t = pbt_centroids(text_features, image_clusters.labels, k)
    external = None
    empty_e = 0
    if external_labels is not None:
        image_from_external, empty_ie = pbt_centroids(image_features, external_labels, k)
        text_from_external, empty_te = pbt_centroids(text_features, external_labels, k)
        external = ExternalPrototypes(external_labels, image_from_external, text_from_external)
        empty_e = empty_ie + empty_te
    return EpisodePrototypes(
        image_labels=image_clusters.labels,
        text_labels=text_clusters.labels,
        image_centroids=image_clusters.centroids,
        text_centroids=text_clusters.centroids,
        image_from_text=image_from_text,
        text_from_image=text_from_image,
        external=external,
        empty=empty_i + empty_t + empty_e,
    )


@dataclass(frozen=True)
class TermWeights:
    """Weight of each prototype term: the paper's w_proto·½ and w_ext·½ with w = 1."""

    i2t: float = 0.5
    t2i: float = 0.5
    i2e: float = 0.5
    t2e: float = 0.5


def protoclip_terms(
    image_projected: Tensor,
    text_projected: Tensor,
    episode_index: Tensor,
    prototypes: EpisodePrototypes,
    scale: Tensor,
    target_temperature: float = 0.01,
    weights: TermWeights | None = None,
) -> dict[str, Tensor]:
    """The weighted prototype terms of one batch (see the module docstring's table).

    Args:
        image_projected, text_projected: ``[b, d]`` L2-normalised head outputs.
        episode_index: ``long [b]`` each batch sample's row in the episode (its labels' index).
        prototypes: the episode's :class:`EpisodePrototypes`, on the batch's device.
        scale: 0-dim prototype scale s_p.
        target_temperature: τ_t of the I→T / T→I soft targets (``<= 0``: hard labels).
        weights: per-term weights (default ½ each).

    Returns:
        ``proto_i2t_loss``, ``proto_t2i_loss`` (and ``proto_i2e_loss``, ``proto_t2e_loss`` with
        an external teacher), already weighted, and ``proto_empty_clusters`` (a float count,
        logged, not summed: the trainer sums the ``*_loss`` keys only).
    """
    w = weights or TermWeights()
    text_labels = prototypes.text_labels[episode_index]
    image_labels = prototypes.image_labels[episode_index]
    i2t_targets = soft_targets(prototypes.text_centroids, text_labels, target_temperature)
    t2i_targets = soft_targets(prototypes.image_centroids, image_labels, target_temperature)
    terms = {
        "proto_i2t_loss": w.i2t
        * prototype_loss(image_projected, prototypes.image_from_text, i2t_targets, scale),
        "proto_t2i_loss": w.t2i
        * prototype_loss(text_projected, prototypes.text_from_image, t2i_targets, scale),
    }
    if prototypes.external is not None:
        external = prototypes.external
        k = external.image_from_external.shape[0]
        targets = hard_targets(external.labels[episode_index], k, image_projected.dtype)
        terms["proto_i2e_loss"] = w.i2e * prototype_loss(
            image_projected, external.image_from_external, targets, scale
        )
        terms["proto_t2e_loss"] = w.t2e * prototype_loss(
            text_projected, external.text_from_external, targets, scale
        )
    terms["proto_empty_clusters"] = image_projected.new_tensor(float(prototypes.empty))
    return terms

"""ProtoCLIP's math (Chen et al., arXiv 2206.10996; official code megvii-research/protoclip):
episodic k-means, Prototypical Back Translation, the prototype losses and the projection heads;
the objective (``objective.name=protoclip``) is :mod:`vlp.objectives.protoclip.objective`."""

from vlp.objectives.protoclip.heads import ProjectionHead, no_decay_parameter_names
from vlp.objectives.protoclip.kmeans import KMeansResult, kmeans, nearest_centroids
from vlp.objectives.protoclip.prototypes import (
    EpisodePrototypes,
    ExternalPrototypes,
    TermWeights,
    episode_prototypes,
    hard_targets,
    pbt_centroids,
    protoclip_terms,
    prototype_loss,
    soft_targets,
)

__all__ = [
    "EpisodePrototypes",
    "ExternalPrototypes",
    "KMeansResult",
    "ProjectionHead",
    "TermWeights",
    "episode_prototypes",
    "hard_targets",
    "kmeans",
    "nearest_centroids",
    "no_decay_parameter_names",
    "pbt_centroids",
    "protoclip_terms",
    "prototype_loss",
    "soft_targets",
]

"""The contract of an episodic objective (ProtoCLIP): what :mod:`vlp.training.episodes` asks.

Training is cut into episodes of ``episode_samples()`` samples. Before an episode is trained on,
the driver streams it once without gradient (pass 1), hands this objective the gathered
features of every sample of every rank (``begin_episode``), then streams the same samples again
to train on them (pass 2; with new augmented views if ``fresh_views``), each batch carrying
``episode_index``, the rows of its samples in the gathered features. Whatever the objective
derives from pass 1 (cluster labels, centroids) is its episode state: checkpointed
mid-episode, so a resume during pass 2 does not redo pass 1.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vlp.objectives.base import ConfiguredObjective, Tensors

PASS_ONE = "episode_pass_one"
"""The model-input key that tells ``encode`` it runs pass 1 (features to gather only)."""
EPISODE_INDEX = "episode_index"
"""The batch key of each sample's row in the episode's gathered features."""


class EpisodicObjective(ConfiguredObjective):
    """An objective trained in episodes (see the module docstring)."""

    def episode_samples(self) -> int:
        """M: samples per episode over all ranks (a multiple of the global batch)."""
        raise NotImplementedError

    def image_lr_end(self, steps_per_episode: int, episodes: int) -> int | None:
        """The step at which the image tower's lr cosine reaches 0, when earlier than
        ``train.steps`` (its parameters then get optimizer groups of their own); None: one
        schedule for every parameter."""
        return None

    def fresh_views(self) -> bool:
        """Whether pass 2 reads the episode's samples with newly drawn augmented views (True)
        or replays pass 1's (False)."""
        return False

    def needs_features(self, episode: int, episodes: int) -> bool:
        """Whether episode ``episode`` (of ``episodes``) runs pass 1 at all."""
        return True

    def episode_features(self, outputs: Tensors, batch: Mapping[str, Any]) -> Tensors:
        """Pass 1: this rank's ``[b, d]`` tensors to gather, from the model's outputs for
        ``{**model_inputs(batch), PASS_ONE: True}`` and the batch."""
        raise NotImplementedError

    def begin_episode(self, episode: int, episodes: int, features: Tensors | None) -> Tensors:
        """Set up episode ``episode``: ``features`` holds every gathered tensor ``[M, d]``, in
        episode-row order, identical on every rank (None when ``needs_features`` said no).
        Returns 0-dim values to log (``episode/<name>``)."""
        raise NotImplementedError

    def episode_state(self) -> Tensors:
        """What a checkpoint taken during pass 2 must keep (on every rank alike)."""
        return {}

    def load_episode_state(self, episode: int, episodes: int, state: Tensors) -> None:
        """Continue episode ``episode`` from ``episode_state()`` (a resume during pass 2)."""

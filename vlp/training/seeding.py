"""Per-rank random seeds, set once the model is built (as open_clip's training reseeds with
``random_seed(args.seed, args.rank)`` after ``create_model``).

``launch/run.py`` seeds every rank with ``train.seed`` before it builds the model, and the
Trainer builds the objective's heads from that same state, so the initial weights agree on every
rank (FSDP shards each rank's own copy; DDP would broadcast rank 0's anyway). Then the Trainer
reseeds each rank from ``(train.seed, rank)``: dropout, drop-path and any other draw of a training
step differ between ranks. With one seed everywhere every rank drew the same masks, as if the
global batch were regularised by one rank's mask pattern.

Still a pure function of the config: two runs draw the same masks, and a resume restores each
rank's own generator states (``rng_rank<r>`` in every checkpoint), so it draws what the
uninterrupted run would have drawn.
"""

from __future__ import annotations

import hashlib

from accelerate.utils import set_seed


def rank_seed(seed: int, rank: int) -> int:
    """The 32-bit seed of ``rank`` in a run seeded ``seed`` (NumPy takes at most 32 bits).

    A hash of both, not ``seed + rank``: under a sum, seed 1's rank 0 would draw exactly what
    seed 0's rank 1 draws, so runs meant to differ by their seed would share masks.
    """
    digest = hashlib.sha256(f"vlp-rank-seed:{seed}:{rank}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def seed_rank(seed: int, rank: int) -> int:
    """Seed Python's ``random``, NumPy and torch (CPU and every accelerator) with
    :func:`rank_seed`; returns that seed. Call after every parameter has been made."""
    value = rank_seed(seed, rank)
    set_seed(value)
    return value


def derive_step_seed(seed: int, step: int) -> int:
    """The seed a resume on another number of processes draws from at ``step``: every rank's
    generators start anew there (the saved ones belong to other processes), reproducibly."""
    digest = hashlib.sha256(f"vlp-step-seed:{seed}:{step}".encode()).digest()
    return int.from_bytes(digest[:4], "little")

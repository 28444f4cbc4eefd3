"""What the ``data`` section decides about the training stream, as one frozen value.

:func:`data_pipelines.stream.make_train_stream` takes the shard URLs, these settings (the same
on every rank), the batch fields and the rank and world size. ``launch.build.stream_settings``
builds them once from a run's config; a test or a benchmark writes
``StreamSettings(batch_size=8, ...)`` or ``dataclasses.replace(settings, seed=1)``.
"""

from __future__ import annotations

from dataclasses import dataclass

from data_pipelines.decode import DEFAULT_MAX_PIXELS, IMAGE_MEMBERS


@dataclass(frozen=True)
class StreamSettings:
    """How the training stream reads, shuffles, decodes and batches (see ``stream.py``).

    Raises:
        ValueError: ``batch_size < 1``, ``workers < 0`` or ``shards_in_flight < 1``.
    """

    batch_size: int
    """Samples per batch on each rank (``data.batch_size``)."""
    workers: int = 0
    """DataLoader worker processes per rank (``data.workers``); 0 reads in the main process.
    Each serves whole canonical streams, so a rank uses the most workers, up to this many,
    that divide its streams (``stream.serving_workers``)."""
    accum_steps: int = 1
    """Micro-batches per optimizer step on each rank (``train.accum_steps``)."""
    streams: int = 0
    """Canonical streams C (``data.streams``): the global batch sequence depends on them, not
    on processes, micro-steps or workers. A multiple of processes × accum_steps; 0: processes
    × accum_steps × max(workers, 1) (a resume keeps the checkpoint's)."""
    seed: int = 0
    """Seeds the shard draws, the shuffle buffer and every sample's augmentation
    (``train.seed``)."""
    resampled: bool = True
    """Draw shards with replacement, forever (``data.resampled``); False: epochs over disjoint
    shards, the same number of batches from every canonical stream, the rest dropped and counted
    (``stream_plan``)."""
    shuffle_buffer: int = 1000
    """Samples in each stream's seeded shuffle buffer (``data.shuffle_buffer``; 0 or 1: none)."""
    shards_in_flight: int = 8
    """Shards each stream reads at once, a sample from each in turn, so that shards written in
    class order still mix (``data.shards_in_flight``; costs one open stream each)."""
    epoch: int = 0
    """The epoch the stream starts at (epoch mode)."""
    weights: tuple[float, ...] | None = None
    """One per ``::`` source, open_clip's upsampling factors (``data.train_weights``);
    resampled mode only."""
    image_keys: tuple[str, ...] = IMAGE_MEMBERS
    """Sample members tried, in order, for the image (``data.image_keys``)."""
    extra_keys: tuple[str, ...] = ()
    """More members to return as they are (json -> dict, cls -> LongTensor, txt -> str)."""
    draft_size: int | None = None
    """Let JPEGs decode at reduced scale with both sides >= this (the views' transforms decide:
    ``launch.build.StreamParts.draft_size``)."""
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Images with more pixels are skipped as bad data (decompression bombs)."""
    prefetch_factor: int = 2
    """Batches each worker prepares ahead (``data.prefetch_factor``)."""
    timeout: float = 600.0
    """Seconds the DataLoader waits for one batch before it raises (``data.batch_timeout``)."""
    max_skip_fraction: float = 0.1
    """Skipped / seen above this (after 10 batches' worth) stops the run
    (``data.max_skip_fraction``)."""
    max_consecutive_errors: int = 200
    """Failed samples or shards in a row before a worker gives up."""
    remote_timeout: float = 60.0
    """Seconds one read of a remote shard may take before it is re-opened
    (``data.remote_timeout``, :mod:`data_pipelines.remote`)."""
    remote_retries: int = 3
    """Re-opens of a stalled remote shard before the stream raises (``data.remote_retries``)."""
    pin_memory: bool = False
    """The DataLoader copies each batch into page-locked memory (its pin thread), so that the
    copy to a CUDA device runs asynchronously (``non_blocking``); on when the run's device is
    CUDA (``launch.build.StreamParts.pin_memory``)."""

    def __post_init__(self) -> None:
        if (
            self.batch_size < 1
            or self.workers < 0
            or self.shards_in_flight < 1
            or self.accum_steps < 1
            or self.streams < 0
        ):
            raise ValueError(
                "stream settings need batch_size >= 1, workers >= 0, shards_in_flight >= 1, "
                f"accum_steps >= 1 and streams >= 0; got batch_size={self.batch_size}, "
                f"workers={self.workers}, shards_in_flight={self.shards_in_flight}, "
                f"accum_steps={self.accum_steps}, streams={self.streams}"
            )

"""A resume on another number of processes: the global batch stays, ``train.accum_steps`` moves
(or, when asked, the global batch changes and the learning rate with it).

The training stream's global batch sequence depends on the global batch and the micro-batch
(``data.batch_size``), not on how processes and micro-steps share it
(:mod:`data_pipelines.stream_plan`), and the exact loss over the global batch does not depend
on that split either (GradCache). So a checkpoint written by N processes with k micro-batches
each continues on M processes with N·k / M micro-batches, when that is a whole number. With
``train.elastic=rescale_lr`` the config's own global batch B' is used instead of the saved B,
``optim.lr`` is multiplied by B' / B (the linear scaling rule, Goyal et al. 2017), and the
Trainer draws the stream afresh (the old sequence has no continuation at another B).
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

from launch.build import StartupError
from vlp import run_folder
from vlp.config import Config

logger = logging.getLogger("vlp")


def resume_layout(config: Config, processes: int) -> Config:
    """``config`` with ``train.accum_steps`` set so that a resume on ``processes`` processes
    keeps the checkpoint's global batch; unchanged when there is nothing to resume, the
    checkpoint has this many processes, or ``train.accum_steps`` already fits. With
    ``train.elastic=rescale_lr`` and another global batch in the config: ``optim.lr`` scaled by
    new / old instead (the Trainer then draws the stream afresh).

    Raises:
        StartupError: no whole number of micro-batches of ``data.batch_size`` per process
            makes the checkpoint's global batch (the message lists what would).
    """
    if not config.train.resume:
        return config
    directory = run_folder.checkpoints_dir(Path(config.train.out_dir))
    try:
        path = run_folder.resolve_resume(config.train.resume, directory)
    except FileNotFoundError:
        return config  # the Trainer says so, in its words
    if path is None:
        return config
    state = json.loads((path / run_folder.TRAINER_STATE).read_text())
    saved_processes, global_batch = int(state["world_size"]), state.get("global_batch")
    if global_batch is None:
        return config
    micro = config.data.batch_size
    new_batch = micro * config.train.accum_steps * processes
    if config.train.elastic == "rescale_lr" and new_batch != global_batch:
        lr = config.optim.lr * new_batch / global_batch
        logger.info(
            "train.elastic=rescale_lr: global batch %d where checkpoint %s has %d: optim.lr %g "
            "x %d / %d = %g (linear scaling); the data stream is drawn afresh",
            new_batch, path, global_batch, config.optim.lr, new_batch, global_batch, lr,
        )  # fmt: skip
        return replace(config, optim=replace(config.optim, lr=lr))
    if saved_processes == processes:
        return config
    if global_batch % (micro * processes):
        slots = global_batch // micro if global_batch % micro == 0 else 0
        fits = [n for n in range(1, slots + 1) if slots % n == 0]
        raise StartupError(
            f"train.resume: checkpoint {path} has a global batch of {global_batch} (written by "
            f"{saved_processes} processes); {processes} processes x data.batch_size={micro} "
            f"cannot make it with a whole number of micro-batches: resume on "
            f"{' or '.join(map(str, fits)) or 'the same number of'} processes, or with the "
            "data.batch_size it was written with (or change the global batch: "
            "train.elastic=rescale_lr)"
        )
    accum = global_batch // (micro * processes)
    if accum != config.train.accum_steps:
        logger.info(
            "resuming on %d processes where checkpoint %s has %d: train.accum_steps=%d (was %d) "
            "keeps the global batch of %d",
            processes, path, saved_processes, accum, config.train.accum_steps, global_batch,
        )  # fmt: skip
        config = replace(config, train=replace(config.train, accum_steps=accum))
    return config

"""The only place vlp moves data between ranks: rank helpers, counted collectives, the ring shift.

Process groups are made in :mod:`vlp.distributed.groups`, which sends nothing itself.

None of these collectives carries autograd. Features are never gathered: the losses pass them
around the group with :class:`RingShift` inside their own autograd functions
(:mod:`vlp.distributed.tiles`), whose backward sends each column chunk's gradient around the ring
with the chunk, so that it reaches the owning rank as the SUM of every rank's loss gradient (not a
mean). DDP then averages parameter gradients over ranks, which together gives exactly the
full-batch gradient (open_clip#616, lightly#1977 are the 1/N bugs this avoids).
``accelerator.gather`` does not carry gradients and must not be used for features. (Episodic
objectives gather DETACHED features once per episode, :mod:`vlp.training.episodes`, to cluster
them; that is the one all-gather of features, and no gradient goes through it.)

Every collective here adds the bytes this rank sends to a per-process counter
(:func:`bytes_sent`), so that tests and benchmarks can show what a loss communicates. The count is
the payload a bandwidth-optimal algorithm sends: (G−1)·n for an all-gather of n local bytes,
2·(G−1)/G·n for an all-reduce of n bytes, n for a point-to-point send.

Every tensor handed to ``torch.distributed`` lives on :func:`collective_device`: accelerate starts
multi-GPU runs with an NCCL-only group, which refuses CPU tensors ("No backend type associated
with device type cpu"). Callers may pass tensors from anywhere (a flag made on the CPU); the
collectives move them there and give their results back on the caller's device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

ProcessGroup = Any  # torch.distributed.ProcessGroup; Any keeps mypy quiet across torch versions

_bytes_sent = 0


def is_distributed() -> bool:
    """True when a default process group exists and has more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size(group: ProcessGroup | None = None) -> int:
    """Ranks in ``group`` (all ranks when None); 1 without torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def rank(group: ProcessGroup | None = None) -> int:
    """This process's rank inside ``group`` (0 without torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    return dist.get_rank(group)


# The device types each plain backend takes tensors from (the first is where we put them).
_BACKEND_DEVICES = {"nccl": ("cuda",), "gloo": ("cpu",), "mpi": ("cpu",), "ucc": ("cpu", "cuda")}


def _backend_device_types(group: ProcessGroup | None) -> tuple[str, ...]:
    """Device types ``group``'s backend accepts: "nccl" → (cuda,), "cpu:gloo,cuda:nccl" → both."""
    if not (dist.is_available() and dist.is_initialized()):
        return ("cpu",)
    backend = str(dist.get_backend(group)).lower()
    if ":" in backend:  # a per-device backend string
        types = tuple(part.split(":")[0].strip() for part in backend.split(","))
        return ("cpu", *(t for t in types if t != "cpu")) if "cpu" in types else types
    return _BACKEND_DEVICES.get(backend, ("cpu",))


def _device_of_type(device_type: str) -> torch.device:
    if device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(device_type)


def collective_device(group: ProcessGroup | None = None) -> torch.device:
    """Where a tensor must live to go through ``group``'s backend.

    ``cuda:<current>`` for NCCL, the CPU for gloo/MPI and for a mixed backend that includes
    gloo ("cpu:gloo,cuda:nccl"), the CPU without torch.distributed.
    """
    return _device_of_type(_backend_device_types(group)[0])


def _to_backend(tensor: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """``tensor`` itself if ``group``'s backend takes its device, else a copy on
    :func:`collective_device` (a mixed backend keeps GPU features on the GPU)."""
    if tensor.device.type in _backend_device_types(group):
        return tensor
    return tensor.to(collective_device(group))


def bytes_sent() -> int:
    """Bytes this process has sent through vlp's collectives since the last reset."""
    return _bytes_sent


def reset_bytes_sent() -> None:
    """Start counting :func:`bytes_sent` from zero."""
    global _bytes_sent
    _bytes_sent = 0


def _count(nbytes: float) -> None:
    global _bytes_sent
    _bytes_sent += round(nbytes)


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def all_gather(tensor: torch.Tensor, group: ProcessGroup | None = None) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (same shape everywhere), without autograd; counted."""
    size = world_size(group)
    if size == 1:
        return [tensor]
    sent = _to_backend(tensor, group).contiguous()
    parts = [torch.empty_like(sent) for _ in range(size)]
    dist.all_gather(parts, sent, group=group)
    _count((size - 1) * _nbytes(tensor))
    return [part.to(tensor.device) for part in parts]


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """In place: every rank's ``tensor`` becomes (global) rank ``src``'s, without autograd;
    counted on ``src`` (same shape and dtype everywhere). Returns ``tensor``."""
    if world_size() > 1:
        sent = _to_backend(tensor, None).contiguous()
        dist.broadcast(sent, src=src)
        if sent is not tensor:
            tensor.copy_(sent)
        if rank() == src:
            _count(_nbytes(tensor))
    return tensor


def all_reduce_(
    tensor: torch.Tensor, op: Any = None, group: ProcessGroup | None = None
) -> torch.Tensor:
    """In-place all-reduce (SUM unless ``op``), without autograd; counted. Returns ``tensor``."""
    size = world_size(group)
    if size > 1:
        sent = _to_backend(tensor, group)
        dist.all_reduce(sent, op=dist.ReduceOp.SUM if op is None else op, group=group)
        if sent is not tensor:
            tensor.copy_(sent)
        _count(2 * (size - 1) / size * _nbytes(tensor))
    return tensor


def all_reduce_mean(value: torch.Tensor, group: ProcessGroup | None = None) -> torch.Tensor:
    """Mean of a (detached) tensor over the ranks of ``group``; for logging and stop flags."""
    value = all_reduce_(value.detach().clone(), group=group)
    return value / world_size(group)


class RingShift:
    """Point-to-point exchange around ``group``: send to the next rank, receive from the previous.

    Passing chunks around the ring lets every rank see every rank's columns while holding only
    one chunk at a time (Inf-CL): memory O(b·d) instead of the O(B·d) of an all-gather, with
    the same bytes sent per rank.
    """

    def __init__(self, group: ProcessGroup | None = None):
        self.group = group
        self.size = world_size(group)
        self.rank = rank(group)

    def start(self, tensors: Sequence[torch.Tensor]) -> Callable[[], list[torch.Tensor]]:
        """Begin the exchange of ``tensors``; the returned function waits and gives what arrived."""
        if self.size == 1:
            kept = list(tensors)
            return lambda: kept
        devices = [t.device for t in tensors]
        tensors = [_to_backend(t, self.group) for t in tensors]
        received = [torch.empty_like(t) for t in tensors]
        ops = []
        for sent, into in zip(tensors, received, strict=True):
            next_rank, previous_rank = (self.rank + 1) % self.size, (self.rank - 1) % self.size
            ops.append(dist.P2POp(dist.isend, sent, group=self.group, group_peer=next_rank))
            ops.append(dist.P2POp(dist.irecv, into, group=self.group, group_peer=previous_rank))
            _count(_nbytes(sent))
        works = dist.batch_isend_irecv(ops)

        def wait() -> list[torch.Tensor]:
            for work in works:
                work.wait()
            return [t.to(device) for t, device in zip(received, devices, strict=True)]

        return wait

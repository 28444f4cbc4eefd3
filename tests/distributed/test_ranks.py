"""The losses on 2 and 4 gloo processes: exact against the float64 reference per group.

With G ranks per group, group q's ranks together hold rows [qGb, (q+1)Gb) of the global batch.
The mean of its ranks' losses must equal the reference loss of that slice; each rank's feature
gradient (the sum of the group's losses' gradients) divided by G must equal the reference's; the
scale/bias gradients summed over the group's ranks divided by G likewise (DDP averages them).

Bytes: the code's own counter (:func:`vlp.distributed.bytes_sent`) is checked against a formula,
against a recorder of the tensors actually handed to torch.distributed (:class:`_Wire`), and
against what the process really wrote to its sockets (``/proc/self/io``).
"""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from tests.ddp_helpers import run_on_ranks
from tests.distributed.references import infonce_reference, sigmoid_reference, unit_features
from vlp.distributed import (
    NonFiniteFeaturesError,
    bytes_sent,
    contrastive_group,
    contrastive_loss,
    reset_bytes_sent,
    sigmoid_loss,
)

ROWS = 5  # per rank; tile 3 does not divide it, tile 5 does
CASES = [
    {"loss": "infonce", "tile": None, "weights": (0.5, 0.5), "alpha": 0.0},
    {"loss": "infonce", "tile": 3, "weights": (0.75, 0.25), "alpha": 0.2},
    {"loss": "infonce", "tile": 5, "weights": (1.0, 0.3), "alpha": 0.1},
    {"loss": "sigmoid", "tile": None},
    {"loss": "sigmoid", "tile": 3},
    # bf16 features: computed in float32, so the loss matches the float64 reference on the same
    # bf16 values to 1e-5 and the (bf16) gradients to bf16 rounding, 2⁻⁷ of the largest entry.
    {"loss": "infonce", "tile": 3, "weights": (0.75, 0.25), "alpha": 0.2, "bf16": True},
    {"loss": "sigmoid", "tile": 3, "bf16": True},
]


def _scalars():
    return torch.tensor(7.0, dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64)


def _loss(case, z, w, s, bias, group=None):
    if case["loss"] == "infonce":
        return contrastive_loss(
            z, w, s, weights=case["weights"], smoothing=case["alpha"], group=group,
            tile_size=case["tile"],
        )  # fmt: skip
    return sigmoid_loss(z, w, s, bias, group=group, tile_size=case["tile"])


def _reference(case, z, w, s, bias):
    if case["loss"] == "infonce":
        return infonce_reference(z, w, s, case["weights"], case["alpha"])
    return sigmoid_reference(z, w, s, bias)


def _inputs(case, world):
    z, w = unit_features(ROWS * world)
    if case.get("bf16"):  # the reference sees exactly the values the bf16 run sees
        return z.to(torch.bfloat16), w.to(torch.bfloat16)
    return z, w


def _tolerances(case):
    return (1e-5, 1e-5, 2**-7) if case.get("bf16") else (1e-12, 1e-12, 1e-10)


def _group_sizes(world):
    return sorted({1, 2, world})


def _nbytes(tensor):
    return tensor.numel() * tensor.element_size()


class _Wire:
    """Records what crosses the process group, from the tensors handed to torch.distributed.

    While active it wraps ``all_gather``, ``all_reduce`` and ``batch_isend_irecv`` (what
    collectives.py calls) and a direct ``send``/``isend``: ``sent`` adds (G−1)·n for an
    all-gather of n bytes in a ring, 2·(G−1)/G·n for an all-reduce, n for each tensor sent
    point-to-point, with G read from the call itself (the output list, the group passed).
    Any other collective is listed in ``unexpected``. ``P2POp`` is wrapped only to hand it the
    real ``isend``/``irecv``, the only functions it accepts.
    """

    OTHERS = (
        "broadcast", "recv", "irecv", "reduce", "gather", "scatter", "all_gather_into_tensor",
        "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single",
        "all_gather_object", "broadcast_object_list", "all_reduce_coalesced",
    )  # fmt: skip

    def __init__(self) -> None:
        self.sent = Fraction(0)
        self.unexpected: list[str] = []
        self._saved: dict[str, Any] = {}

    def __enter__(self) -> _Wire:
        names = ("all_gather", "all_reduce", "batch_isend_irecv", "send", "isend", "P2POp")
        names += tuple(name for name in self.OTHERS if hasattr(dist, name))
        self._saved = {name: getattr(dist, name) for name in names}
        real = self._saved

        def all_gather(parts, tensor, *args, **kwargs):
            self.sent += (len(parts) - 1) * _nbytes(tensor)
            return real["all_gather"](parts, tensor, *args, **kwargs)

        def all_reduce(tensor, *args, **kwargs):
            size = dist.get_world_size(kwargs.get("group", args[1] if len(args) > 1 else None))
            self.sent += Fraction(2 * (size - 1), size) * _nbytes(tensor)
            return real["all_reduce"](tensor, *args, **kwargs)

        def batch_isend_irecv(ops):
            self.sent += sum(_nbytes(op.tensor) for op in ops if op.op is real["isend"])
            return real["batch_isend_irecv"](ops)

        def p2p_op(op, *args, **kwargs):  # P2POp accepts only the real isend / irecv
            unwrapped = {wrappers["isend"]: real["isend"], wrappers["irecv"]: real["irecv"]}
            return real["P2POp"](unwrapped.get(op, op), *args, **kwargs)

        def send_directly(name: str) -> Callable[..., Any]:
            def record(tensor, *args, **kwargs):
                self.sent += _nbytes(tensor)
                return real[name](tensor, *args, **kwargs)

            return record

        def unexpected(name: str) -> Callable[..., Any]:
            def record(*args, **kwargs):
                self.unexpected.append(name)
                return real[name](*args, **kwargs)

            return record

        wrappers = {name: unexpected(name) for name in real}
        wrappers.update(
            all_gather=all_gather, all_reduce=all_reduce, batch_isend_irecv=batch_isend_irecv,
            P2POp=p2p_op, send=send_directly("send"), isend=send_directly("isend"),
        )  # fmt: skip
        for name, wrapper in wrappers.items():
            setattr(dist, name, wrapper)
        return self

    def __exit__(self, *exc: object) -> None:
        for name, function in self._saved.items():
            setattr(dist, name, function)


def _run_cases(rank, world):
    mine = slice(rank * ROWS, (rank + 1) * ROWS)
    results = {}
    for group_size in _group_sizes(world):
        group = contrastive_group(group_size)
        for index, case in enumerate(CASES):
            z, w = _inputs(case, world)
            leaves = [t.clone().requires_grad_() for t in (z[mine], w[mine], *_scalars())]
            reset_bytes_sent()
            with _Wire() as wire:
                loss = _loss(case, *leaves, group=group)
                loss.backward()
            results[group_size, index] = {
                "loss": loss.detach(),
                "grads": [t.grad for t in leaves if t.grad is not None],
                "bytes": bytes_sent(),
                "wire": float(wire.sent),
                "unexpected": wire.unexpected,
            }
    return results


def _check_against_reference(world):
    per_rank = run_on_ranks(_run_cases, world)
    for group_size in _group_sizes(world):
        for index, case in enumerate(CASES):
            z, w = (t.double() for t in _inputs(case, world))
            loss_rtol, loss_atol, grad_rtol = _tolerances(case)
            for r, result in enumerate(per_rank):  # the counter against the recorded tensors
                got, where = result[group_size, index], f"rank {r}, G={group_size}, case {case}"
                assert got["unexpected"] == [] and got["bytes"] == got["wire"], (where, got)
            for first in range(0, world, group_size):
                ranks = [per_rank[r][group_size, index] for r in range(first, first + group_size)]
                rows = slice(first * ROWS, (first + group_size) * ROWS)
                leaves = [t.clone().requires_grad_() for t in (z[rows], w[rows], *_scalars())]
                ref = _reference(case, *leaves)
                ref.backward()
                got = torch.stack([r["loss"] for r in ranks]).mean()
                torch.testing.assert_close(
                    got.double(), ref.detach(), rtol=loss_rtol, atol=loss_atol
                )
                for k in range(2):  # features: concatenate the ranks' rows
                    ours = torch.cat([r["grads"][k] for r in ranks]).double() / group_size
                    atol = grad_rtol * float(leaves[k].grad.abs().max())
                    torch.testing.assert_close(ours, leaves[k].grad, rtol=grad_rtol, atol=atol)
                for k, leaf in enumerate(leaves[2:], start=2):  # scale, bias: DDP averages
                    if leaf.grad is None:
                        continue
                    ours = torch.stack([r["grads"][k] for r in ranks]).sum() / group_size
                    atol = grad_rtol * float(leaf.grad.abs().max())
                    torch.testing.assert_close(ours, leaf.grad, rtol=grad_rtol, atol=atol)
    return per_rank


def _feature_bytes(case, group_size, d=12):
    """Ring payload: the texts go around once in the forward and once in the backward (G−1
    hops each, in their own dtype) and their gradient (compute dtype) visits all G ranks."""
    if group_size == 1:
        return 0
    feature, compute = (2, 4) if case.get("bf16") else (8, 8)
    return 2 * (group_size - 1) * ROWS * d * feature + group_size * ROWS * d * compute


def _small_bytes(case, group_size, d=12):
    """O(M + d) numbers besides the features: the shape check (3 integers), and for InfoNCE the
    column log-sum-exp (two all-reduces of M), the gradient scalars and the smoothing sums."""
    hops, dtype_bytes = group_size - 1, 4 if case.get("bf16") else 8
    total = 3 * 8 * hops
    if case["loss"] == "infonce":
        total += 2 * 2 * hops * ROWS * dtype_bytes + hops * dtype_bytes
        if case["alpha"]:
            total += 2 * hops * 2 * d * dtype_bytes // group_size
    return total


@pytest.mark.slow
def test_two_ranks_every_group_size():
    per_rank = _check_against_reference(2)
    assert per_rank[0][1, 0]["bytes"] == 0  # G = 1: nothing leaves the rank


@pytest.mark.slow
def test_four_ranks_every_group_size_and_bytes_scale_with_the_group():
    four = _check_against_reference(4)
    for index, case in enumerate(CASES):
        counted = {g: four[0][g, index]["bytes"] for g in (1, 2, 4)}
        assert counted[1] == 0
        for g in (2, 4):
            expected = _feature_bytes(case, g) + _small_bytes(case, g)
            assert counted[g] == expected, (case, counted)
        assert counted[2] < 0.5 * counted[4]


def _bytes_for_group_of_two(rank, world):
    z, w = unit_features(ROWS * world)
    mine = slice(rank * ROWS, (rank + 1) * ROWS)
    leaves = [t.clone().requires_grad_() for t in (z[mine], w[mine], _scalars()[0])]
    reset_bytes_sent()
    contrastive_loss(*leaves, group=contrastive_group(2)).backward()
    return bytes_sent()


@pytest.mark.slow
def test_bytes_per_rank_do_not_grow_with_the_world_size():
    """G = 2 in a world of 2 and in a world of 4: every rank sends the same bytes."""
    two = run_on_ranks(_bytes_for_group_of_two, 2)
    four = run_on_ranks(_bytes_for_group_of_two, 4)
    assert len(set(two + four)) == 1 and two[0] > 0


def _written(path=Path("/proc/self/io")):
    """Bytes this process has passed to write()/writev(), sockets included (gloo's TCP pairs)."""
    for line in path.read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise RuntimeError(f"no wchar in {path}")


def _counted_and_written(rank, world):
    rows, d = 128, 128  # float32: 64 KiB per ring chunk, far above the per-message headers
    z, w = unit_features(rows * world, d=d, dtype=torch.float32)
    mine = slice(rank * rows, (rank + 1) * rows)
    results = {}
    for group_size in sorted({2, world}):
        group = contrastive_group(group_size)
        for name in ("infonce", "sigmoid"):
            leaves = [t.clone().requires_grad_() for t in (z[mine], w[mine], *_scalars())]
            reset_bytes_sent()
            before = _written()
            if name == "infonce":
                contrastive_loss(*leaves[:3], smoothing=0.1, group=group).backward()
            else:
                sigmoid_loss(*leaves, group=group).backward()
            results[group_size, name] = (bytes_sent(), _written() - before)
    return results


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux task I/O accounting")
@pytest.mark.parametrize("world", [2, 4])
def test_bytes_counted_are_the_bytes_written_to_the_sockets(world):
    """An independent measure: gloo's TCP transport sends with writev, which the kernel counts
    in ``/proc/self/io`` wchar. Forward+backward must write at least the counted payload and at
    most 16 KiB more: measured +0.9 KiB (SigLIP, G=2) to +8.4 KiB (InfoNCE with smoothing, G=4)
    of 144-byte gloo headers and small-collective overhead, on 256-650 KiB counted."""
    for rank, results in enumerate(run_on_ranks(_counted_and_written, world)):
        for (group_size, name), (counted, written) in results.items():
            where = f"rank {rank}, G={group_size}, {name}: counted {counted}, wrote {written}"
            assert counted <= written <= counted + 16 * 1024, where
            assert counted >= (group_size - 1) * 128 * 128 * 4, where  # the ring's chunks at least


def _bad_inputs(rank, world):
    z, w = unit_features(4 * world)
    messages = {}
    rows = 4 + rank  # rank 1 passes one row more: every rank must refuse, none may hang
    try:
        contrastive_loss(z[:rows], w[:rows], 1.0)
    except ValueError as error:
        messages["shape"] = str(error)
    bad = z[:4].clone()
    if rank == 1:
        bad[2, 3] = float("nan")
    try:
        sigmoid_loss(bad, w[:4], 1.0, 0.0)
    except NonFiniteFeaturesError as error:
        messages["nan"] = str(error)
    try:
        contrastive_group(3)
    except ValueError as error:
        messages["group"] = str(error)
    return messages


@pytest.mark.slow
def test_bad_inputs_fail_on_every_rank_with_the_sizes():
    for messages in run_on_ranks(_bad_inputs, 2):
        assert "rank 0: [4, 12], rank 1: [5, 12]" in messages["shape"]
        assert "rank(s) [1]" in messages["nan"]
        assert "group_size=3" in messages["group"] and "world size 2" in messages["group"]

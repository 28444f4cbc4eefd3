"""Open remote shards through fsspec with a read timeout and bounded retries.

webdataset 1.0.2 opens http(s) with ``curl --connect-timeout 30 --retry 30`` and no overall
limit, so a server that stops answering hangs the stream forever, and ``s3`` is not among its
schemes. :func:`register_remote_openers` replaces the remote entries of webdataset's public
``gopen_schemes`` with :func:`open_remote`: any fsspec URL (``http``, ``https``, ``s3``, ``gs``,
``hf``, ...) read by a helper thread, each read waiting at most ``timeout`` seconds; a stalled or
failed read re-opens the URL at the same byte offset, up to ``retries`` times, then raises
:class:`RemoteShardError` naming the URL. A shard that does not exist (HTTP 404, no such key)
raises ``FileNotFoundError`` at once: that is bad data, skipped and counted by the stream; a
server that cannot be reached (fsspec's http reports that as ``FileNotFoundError`` too) is
retried. Retries wait 0.5 s, 1 s, 2 s, ... (at most ``timeout``) so that a server that restarts
gets a moment. The helper thread is a daemon: a read stuck in the kernel cannot keep the
process alive.
"""

from __future__ import annotations

import functools
import io
import queue
import threading
import time
from collections.abc import Callable
from typing import IO, Any

import fsspec
import webdataset as wds

REMOTE_SCHEMES = ("http", "https", "s3", "gs", "gcs", "hf", "az", "abfs", "abfss")
BACKOFF_S = 0.5
"""The wait before the first retry; it doubles with each retry, up to the read timeout."""


def is_missing(error: FileNotFoundError) -> bool:
    """True when the shard does not exist (HTTP 404/410, no such key); False when fsspec's
    http wraps a failure to reach the server (refused, reset) as ``FileNotFoundError``."""
    cause = error.__cause__
    return (
        cause is None
        or isinstance(cause, FileNotFoundError)
        or (getattr(cause, "status", None) in (404, 410))
    )


class RemoteShardError(Exception):
    """A remote shard stalled or failed on every retry. Not a data error: it stops the run with
    this message (a silent server would otherwise hang every rank)."""


class _Reader:
    """One daemon thread that performs blocking reads on behalf of the caller."""

    def __init__(self, handle: IO[bytes]) -> None:
        self.handle = handle
        self.requests: queue.Queue[int | None] = queue.Queue()
        self.replies: queue.Queue[bytes | BaseException] = queue.Queue()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while (size := self.requests.get()) is not None:
            try:
                self.replies.put(self.handle.read(size))
            except BaseException as error:  # handed to the caller, who decides
                self.replies.put(error)

    def read(self, size: int, timeout: float) -> bytes:
        self.requests.put(size)
        reply = self.replies.get(timeout=timeout)  # queue.Empty on timeout
        if isinstance(reply, BaseException):
            raise reply
        return reply

    def close(self) -> None:
        self.requests.put(None)


class TimedStream(io.RawIOBase):
    """A read-only byte stream whose every read finishes within ``timeout`` seconds or retries.

    ``open_handle()`` opens the source from its start; after a failure the stream re-opens it
    and skips the bytes already delivered, so the caller sees one uninterrupted stream.
    """

    def __init__(
        self, url: str, open_handle: Callable[[], IO[bytes]], timeout: float, retries: int
    ) -> None:
        super().__init__()
        self.url, self.open_handle = url, open_handle
        self.timeout, self.retries = timeout, retries
        self.offset = 0
        self._reader: _Reader | None = None

    def readable(self) -> bool:
        return True

    def _open_at_offset(self) -> _Reader:
        reader = _Reader(self._call(self.open_handle))
        remaining = self.offset
        while remaining:
            skipped = reader.read(min(remaining, 1 << 20), self.timeout)
            if not skipped:
                raise EOFError(
                    f"{self.url} is shorter on re-open than the {self.offset} bytes read"
                )
            remaining -= len(skipped)
        return reader

    def _call(self, function: Callable[[], IO[bytes]]) -> IO[bytes]:
        box: queue.Queue[IO[bytes] | BaseException] = queue.Queue()

        def run() -> None:
            try:
                box.put(function())
            except BaseException as error:
                box.put(error)

        threading.Thread(target=run, daemon=True).start()
        result = box.get(timeout=self.timeout)
        if isinstance(result, BaseException):
            raise result
        return result

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        last: BaseException | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(BACKOFF_S * 2 ** (attempt - 1), self.timeout))
            try:
                if self._reader is None:
                    self._reader = self._open_at_offset()
                data = self._reader.read(len(view), self.timeout)
            except FileNotFoundError as error:
                if is_missing(error):
                    raise
                last = error.__cause__ or error
                self._reader = None
                continue
            except (queue.Empty, OSError, EOFError) as error:
                # A stalled or broken connection: drop this reader (its thread is a daemon).
                last = error
                self._reader = None
                continue
            view[: len(data)] = data
            self.offset += len(data)
            return len(data)
        reason = "no data" if isinstance(last, queue.Empty) else repr(last)
        raise RemoteShardError(
            f"shard {self.url}: {reason} within {self.timeout:g} s, {self.retries} retries "
            f"spent (at byte {self.offset}); data.remote_timeout / data.remote_retries set this"
        )

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        super().close()


def open_remote(
    url: str, mode: str = "rb", bufsize: int = 1 << 20, *, timeout: float, retries: int, **_: Any
) -> IO[bytes]:
    """Open an fsspec URL for streaming reads with a per-read ``timeout`` and bounded retries."""
    if mode != "rb":
        raise ValueError(f"remote shards are read-only; got mode {mode!r} for {url}")

    def open_handle() -> IO[bytes]:
        # block_size=0: a plain streaming read (no range requests, works with any HTTP server).
        options = {"block_size": 0} if url.startswith(("http://", "https://")) else {}
        handle: IO[bytes] = fsspec.open(url, "rb", **options).open()
        return handle

    raw = TimedStream(url, open_handle, timeout, retries)
    return io.BufferedReader(raw, buffer_size=bufsize)


def register_remote_openers(timeout: float = 60.0, retries: int = 3) -> None:
    """Route webdataset's remote schemes through :func:`open_remote` (idempotent)."""
    if timeout <= 0 or retries < 0:
        raise ValueError(f"need timeout > 0 and retries >= 0, got {timeout} and {retries}")
    opener = functools.partial(open_remote, timeout=timeout, retries=retries)
    for scheme in REMOTE_SCHEMES:
        wds.gopen_schemes[scheme] = opener

"""A create body sent as its parts: the base64 images are never joined into one buffer.

A full-size request carries 5 × 6.3 MB of base64. Joining that with the JSON
around it costs a 31 MB allocation and copy (page faults included) that took
longer than the encoding itself when measured (``benchmarks/bench_preprocess.py``).
The transport does not need one buffer: :class:`BodyParts` is an aiohttp
``Payload`` with a known size (so ``Content-Length`` is sent, never chunked
encoding) that writes the head, each image and the separators in turn, draining
the socket between large parts. It is immutable, so a create that is retried
(only when no task can exist) sends the same parts again.

Each part goes out in slices of at most :data:`WRITE_CHUNK_BYTES` (memoryviews, no
copy), awaiting the writer's drain and yielding to the loop after each: a 2.5 MB
part handed to the transport whole made one callback copy it into the transport's
buffer, and (CPython 3.11) every later send shift what was left of it, holding the
event loop for 10-20 ms (``benchmarks/bench_looplag.py``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Final

from aiohttp.abc import AbstractStreamWriter
from aiohttp.payload import Payload

__all__ = ["WRITE_CHUNK_BYTES", "BodyParts"]

#: The most bytes handed to the transport in one write: small enough that no loop
#: callback copies or sends more than a fraction of a millisecond's worth.
WRITE_CHUNK_BYTES: Final = 256 * 1024


class BodyParts(Payload):
    """A JSON body given as byte strings whose concatenation is the document."""

    _autoclose = True  # only bytes in memory: nothing to close
    #: The body's length: aiohttp's ``Payload.size`` (the Content-Length) reads it.
    _size: int

    def __init__(self, parts: Sequence[bytes], **kwargs: Any) -> None:
        self.parts: tuple[bytes, ...] = tuple(parts)
        # The parts are held here only (not as the Payload's value), so release() frees them.
        super().__init__(None, content_type="application/json", **kwargs)
        self._size = sum(map(len, self.parts))

    async def release(self) -> None:
        """Free the parts one per loop turn, once the body can no longer be sent.

        Freeing a full-size body's megabytes at once (the pages go back to the
        system) held the event loop for about a millisecond per job.
        """
        parts, self.parts = list(self.parts), ()
        while parts:
            parts.pop()
            await asyncio.sleep(0)

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return b"".join(self.parts).decode(encoding, errors)

    async def write(self, writer: AbstractStreamWriter) -> None:
        await self.write_with_length(writer, None)

    async def write_with_length(
        self, writer: AbstractStreamWriter, content_length: int | None
    ) -> None:
        remaining = self._size if content_length is None else content_length
        for part in self.parts:
            if remaining <= 0:
                break
            if len(part) <= WRITE_CHUNK_BYTES:
                chunk = part if len(part) <= remaining else part[:remaining]
                await writer.write(chunk)
                remaining -= len(chunk)
                continue
            view = memoryview(part)[:remaining]
            for start in range(0, len(view), WRITE_CHUNK_BYTES):
                await writer.write(view[start : start + WRITE_CHUNK_BYTES])
                # Back-pressure: wait while the transport's buffer is over its high
                # mark; then let other callbacks run even if the socket took it all.
                await writer.drain()
                await asyncio.sleep(0)
            remaining -= len(view)

    def __len__(self) -> int:
        return self._size

    def __repr__(self) -> str:
        return f"<BodyParts {len(self.parts)} parts, {self._size} bytes>"

"""The image thread's work in bounded steps, the CPU given up between them.

On a core shared with the event loop, the kernel lets a running thread finish its
time slice before a woken loop thread runs. A step that reads or encodes a whole
1.9 MB file takes 0.5-3.5 ms, most of it page faults of fresh memory
(``benchmarks/bench_looplag.py``), and the loop's timers waited for it. Each step
here handles at most :data:`PIECE_BYTES` of input; between steps the thread yields
its CPU to any runnable thread. The base64 of a large image stays in pieces (their
concatenation is its base64): joining them would be one more multi-millisecond step.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Final

import pybase64

__all__ = ["PIECE_BYTES", "encode_pieces", "yield_cpu"]

#: Input bytes per read or encode step: a multiple of 3, so the pieces' base64 needs
#: no padding between them (512 KiB of base64 per piece).
PIECE_BYTES: Final = 3 * 128 * 1024

#: Gives the calling thread's CPU to any runnable thread (the event loop's) that waits for it.
yield_cpu: Final[Callable[[], None]] = getattr(os, "sched_yield", lambda: None)


def encode_pieces(data: bytes | memoryview) -> tuple[bytes, ...]:
    """The base64 of ``data``, :data:`PIECE_BYTES` of input at a time, yielding between."""
    if len(data) <= PIECE_BYTES:
        return (pybase64.b64encode(data),)
    view = memoryview(data)
    pieces = []
    for start in range(0, len(view), PIECE_BYTES):
        pieces.append(pybase64.b64encode(view[start : start + PIECE_BYTES]))
        yield_cpu()
    return tuple(pieces)

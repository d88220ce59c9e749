"""Helpers shared by the benchmarks: medians, a table printer, fake servers to measure against.

Every benchmark is a script that prints a table; none asserts on wall-clock time.
Figures are medians of several runs, and each ratio uses a baseline measured in the
same run on the same machine (2 shared, noisy cores here).

Two ways to run the fake service:

* :func:`fake_server_process`: ``python -m dreamo_async.testing`` in another process,
  so the server's CPU does not share the measuring loop (throughput);
* :func:`threaded_fake_server` (from ``tests/helpers.py``, which the tests use too): a
  :class:`FakeDreamOServer` on its own loop in a thread, when the benchmark reads the
  server's own counters (arrival times, 429s).
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tests.helpers import KEY as KEY
from tests.helpers import threaded_fake_server as threaded_fake_server

ROOT = Path(__file__).resolve().parent.parent


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def interpreter() -> str:
    """The interpreter the figures were measured on (they move between versions)."""
    return f"{platform.python_implementation()} {platform.python_version()}"


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A plain-text table (Markdown-compatible, so it can be pasted into the README)."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    print(f"\n{title} [{interpreter()}]")
    for n, row in enumerate(cells):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
        if n == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    sys.stdout.flush()


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


@contextlib.contextmanager
def fake_server_process(*args: str, cpus: set[int] | None = None) -> Iterator[str]:
    """Run ``python -m dreamo_async.testing ARGS`` in another process; yield its URL.

    ``cpus``: the only CPUs the server's threads may run on (Linux), set before it starts.
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-m", "dreamo_async.testing", "--api-key", KEY, *args],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=None if cpus is None else lambda: os.sched_setaffinity(0, cpus),
    )
    assert process.stdout is not None
    try:
        line = process.stdout.readline().strip()
        if not line.startswith("READY "):
            raise RuntimeError(f"fake server did not start: {line!r}")
        yield line.split(" ", 1)[1]
    finally:
        process.terminate()
        process.wait(timeout=10)
        process.stdout.close()


def photo_like_jpeg(
    seed: int, width: int, height: int, *, max_bytes: int, noise: float, max_quality: int
) -> bytes:
    """A photo-like JPEG (noisy gradients) of the largest quality that fits ``max_bytes``.

    A binary search on the quality: the benchmarks want inputs just under a size, made
    the same way every time from ``seed``.
    """
    import io
    import random

    from PIL import Image

    rng = random.Random(seed)
    grain = Image.frombytes("L", (width, height), rng.randbytes(width * height))
    gradient = Image.linear_gradient("L").resize((width, height))
    channels = [Image.blend(gradient.rotate(angle), grain, noise) for angle in (0, 90, 180)]
    image = Image.merge("RGB", channels)
    best, low, high = b"", 30, max_quality
    while low <= high:
        quality = (low + high) // 2
        out = io.BytesIO()
        image.save(out, "JPEG", quality=quality)
        if out.tell() <= max_bytes:
            best, low = out.getvalue(), quality + 1
        else:
            high = quality - 1
    return best

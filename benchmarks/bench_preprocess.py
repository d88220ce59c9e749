"""Benchmark of the image stage (issue 3): a script that prints a table, not a test.

Run from the repository root::

    .venv/bin/python benchmarks/bench_preprocess.py            # everything (about a minute)
    .venv/bin/python benchmarks/bench_preprocess.py --quick    # fewer runs
    .venv/bin/python benchmarks/bench_preprocess.py --warm-heap  # no page-fault cost

Figures (medians of several runs; every ratio uses a baseline measured in the same run):

(a) full-size request: 5 x ~4.7 MB JPEG files -> create body built (prepare_images,
    then the body's parts, as the client does) against bare pybase64 encoding of
    the same bytes already in memory. Target <= 1.3x.
(b) worst event-loop lag seen by a 1 ms ticker while 4 such jobs run at once. Target <= 5 ms.
(c) header check, µs per image, our parser against Pillow's lazy ``Image.open().size``
    on the odd-files corpus of ``tests/image_corpus.py``, with how many verdicts each
    gets right. Target <= 50 µs.
(d) peak RSS of a fresh subprocess (``VmHWM``; ``ru_maxrss`` off Linux) for 20
    against 200 full-size prepare -> body -> drop cycles through
    ``asyncio.Semaphore(4)`` (the client's job slots). Target: within 1.3x.

The full-size JPEGs (4000 x 3000 noisy gradients, quality tuned to land just under
4,700,000 bytes) are generated once with Pillow and cached in the temp directory.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import anyio  # noqa: E402
import pybase64  # noqa: E402

from benchmarks._common import interpreter, photo_like_jpeg  # noqa: E402
from dreamo_async._body import BodyParts  # noqa: E402
from dreamo_async.images import (  # noqa: E402
    ImageSource,
    classify_images,
    prepare_images,
    stage_limiter,
)
from dreamo_async.images.prepare import _stage_threads  # noqa: E402
from dreamo_async.wire import create_body_parts  # noqa: E402

MODEL = "spark_multi_dreamo"
PARAMS = {"prompt": "the cat from image 1 wearing the hat from image 2", "seed": 7}
TARGET_BYTES = 4_700_000
CACHE = Path(tempfile.gettempdir()) / "dreamo_async_bench"
MAX_CONCURRENCY = 4
#: glibc: big blocks from the heap, never trimmed back to the OS (for --warm-heap).
_WARM_HEAP_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(256 * 2**20),
    "MALLOC_TRIM_THRESHOLD_": str(4 * 2**30),
    "MALLOC_TOP_PAD_": str(64 * 2**20),
}


# --------------------------------------------------------------------------- inputs


def full_size_jpegs(count: int = 5) -> list[Path]:
    """``count`` distinct ~4.7 MB JPEGs, generated once (about a second each) and cached."""
    CACHE.mkdir(exist_ok=True)
    paths = []
    for seed in range(count):
        path = CACHE / f"full_{seed}_v1.jpg"
        if not path.exists():
            data = _make_full_size_jpeg(seed)
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
        paths.append(path)
    return paths


def _make_full_size_jpeg(seed: int) -> bytes:
    """A 12-megapixel photo-like JPEG just under the size limit (binary search on quality)."""
    best = photo_like_jpeg(seed, 4000, 3000, max_bytes=TARGET_BYTES, noise=0.25, max_quality=98)
    if len(best) < 0.9 * TARGET_BYTES:
        raise RuntimeError(f"generated JPEG is only {len(best):,} bytes; adjust the noise")
    return best


# --------------------------------------------------------------------------- (a) body


async def build_body(sources: Sequence[ImageSource], variant: str = "client") -> int:
    """What the client does for one create call, up to the body it POSTs, then drop it.

    ``client``: as ``DreamOClient._create`` does: the images are read, checked and
    encoded in a worker thread, and the body is the JSON head plus the encoded
    images as separate parts (:class:`BodyParts`), never joined. ``joined``: the
    earlier design, for comparison: the parts joined into one 31 MB buffer in a
    worker thread.
    """
    prepared = await prepare_images(sources)
    parts = create_body_parts(MODEL, PARAMS, prepared.base64_pieces, prepared.urls)
    del prepared
    if variant == "client":
        body = BodyParts(parts)
        del parts
        return len(body)
    joined = await anyio.to_thread.run_sync(b"".join, parts, limiter=stage_limiter())
    del parts
    return len(joined)


async def prepare_only(sources: Sequence[ImageSource]) -> int:
    """The image stage alone: read, check, base64 (what this module owns)."""
    prepared = await prepare_images(sources)
    return sum(len(piece) for pieces in prepared.base64_pieces for piece in pieces)


def bare_base64(blobs: Sequence[bytes]) -> int:
    """The baseline: the five encodings a body needs, all alive at the end, as in a request."""
    encoded = [pybase64.b64encode(blob) for blob in blobs]
    return sum(map(len, encoded))


def bare_base64_dropped(blobs: Sequence[bytes]) -> int:
    """A flattering baseline: each encoding dropped at once, so malloc reuses warm memory."""
    return sum(len(pybase64.b64encode(blob)) for blob in blobs)


async def bench_body(paths: Sequence[Path], runs: int) -> dict[str, float]:
    blobs = [path.read_bytes() for path in paths]
    inputs = {"paths": classify_images(paths), "bytes": classify_images(blobs)}
    work: dict[str, Callable[[], Awaitable[object]]] = {}
    for kind, sources in inputs.items():
        work[f"prepare_{kind}"] = functools.partial(prepare_only, sources)
        work[f"client_{kind}"] = functools.partial(build_body, sources, "client")
        work[f"joined_{kind}"] = functools.partial(build_body, sources, "joined")
    # Round-robin, after two warm-up rounds: every variant sees the same drift of the
    # allocator's state (on VMs where a fresh page faults in at several µs, that
    # state moves single timings by milliseconds; --warm-heap takes it out).
    blocking: dict[str, Callable[[], object]] = {
        "base64": lambda: bare_base64(blobs),
        "dropped": lambda: bare_base64_dropped(blobs),
    }
    work["hop"] = lambda: anyio.to_thread.run_sync(int)
    times: dict[str, list[float]] = {name: [] for name in (*blocking, *work)}
    for round_ in range(2 + runs):
        for name, call in blocking.items():
            elapsed = _timed(call)
            if round_ >= 2:
                times[name].append(elapsed)
        for name, job in work.items():
            elapsed = await _atimed(job)
            if round_ >= 2:
                times[name].append(elapsed)
        gc.collect()
    result = {f"{name}_ms": statistics.median(values) * 1e3 for name, values in times.items()}
    result["mb"] = sum(map(len, blobs)) / 1e6
    return result


def _timed(work: Callable[[], object]) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


async def _atimed(work: Callable[[], Awaitable[object]]) -> float:
    started = time.perf_counter()
    await work()
    return time.perf_counter() - started


# --------------------------------------------------------------------------- (b) lag


async def worst_lag(
    sources: Sequence[ImageSource], variant: str, jobs: int = MAX_CONCURRENCY
) -> float:
    """Worst lateness of a 1 ms ticker while ``jobs`` full-size bodies are built at once."""
    done = asyncio.Event()
    worst = 0.0

    async def ticker() -> None:
        nonlocal worst
        while not done.is_set():
            started = time.perf_counter()
            await asyncio.sleep(0.001)
            worst = max(worst, time.perf_counter() - started - 0.001)

    tick = asyncio.ensure_future(ticker())
    await asyncio.sleep(0.01)
    await asyncio.gather(*(build_body(sources, variant) for _ in range(jobs)))
    done.set()
    await tick
    return worst


async def bench_lag(paths: Sequence[Path], runs: int) -> dict[str, float]:
    sources = classify_images(paths)
    result = {"idle_ms": statistics.median([await _idle_lag() for _ in range(5)]) * 1e3}
    for variant in ("client", "joined"):
        lags = [await worst_lag(sources, variant) for _ in range(runs)]
        result[f"{variant}_ms"] = statistics.median(lags) * 1e3
        result[f"{variant}_max_ms"] = max(lags) * 1e3
    return result


async def _idle_lag() -> float:
    worst = 0.0
    for _ in range(200):
        started = time.perf_counter()
        await asyncio.sleep(0.001)
        worst = max(worst, time.perf_counter() - started - 0.001)
    return worst


# --------------------------------------------------------------------------- (c) headers


def bench_headers(runs: int) -> dict[str, Any]:
    from dreamo_async.errors import ImageError
    from dreamo_async.images import inspect_image
    from dreamo_async.limits import Limits
    from tests.image_corpus import build_corpus, pillow_header

    corpus = build_corpus()
    limits = Limits(aspect_policy="off")

    def ours(data: bytes) -> tuple[str, int, int] | None:
        try:
            info, _ = inspect_image(data, index=0, source="x", limits=limits)
        except ImageError:
            return None
        return info.format, info.width, info.height

    def pillow(data: bytes) -> tuple[str, int, int] | None:
        try:
            return pillow_header(data)
        except Exception:  # Pillow raises many types for unreadable files
            return None

    result: dict[str, Any] = {"files": len(corpus)}
    for name, check in (("own", ours), ("pillow", pillow)):
        wrong = [case.name for case in corpus if check(case.data) != case.expect]
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            for _ in range(20):
                for case in corpus:
                    check(case.data)
            times.append((time.perf_counter() - started) / (20 * len(corpus)))
        result[f"{name}_us"] = statistics.median(times) * 1e6
        result[f"{name}_wrong"] = wrong
    return result


# --------------------------------------------------------------------------- (d) memory


async def cycles(paths: Sequence[Path], count: int, variant: str) -> None:
    """``count`` jobs through MAX_CONCURRENCY slots: prepare, build the body, 'send', drop."""
    slots = asyncio.Semaphore(MAX_CONCURRENCY)
    sources = classify_images(paths)

    async def job() -> None:
        async with slots:
            await build_body(sources, variant)
            await asyncio.sleep(0.002)  # the create call

    await asyncio.gather(*(job() for _ in range(count)))


def peak_rss_mb(count: int, variant: str) -> float:
    """``ru_maxrss`` of a fresh interpreter that runs ``count`` cycles (KB on Linux)."""
    out = subprocess.run(
        [sys.executable, __file__, "--rss-child", str(count), "--variant", variant],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return int(out.strip().splitlines()[-1]) / 1024


def _rss_child(count: int, variant: str) -> None:
    asyncio.run(cycles(full_size_jpegs(), count, variant))
    print(_peak_rss_kb())


def _peak_rss_kb() -> int:
    """This process's peak RSS in KB.

    ``ru_maxrss`` on Linux carries over the high-water mark of the image that
    called ``exec``: a child of a 300 MB benchmark process reports at least
    300 MB. ``VmHWM`` belongs to the current address space only, so it is used
    when available (and the measurements also run first, while the parent is small).
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def bench_memory(runs: int) -> dict[str, float]:
    result = {}
    for variant in ("client", "joined"):
        small = statistics.median(peak_rss_mb(20, variant) for _ in range(runs))
        large = statistics.median(peak_rss_mb(200, variant) for _ in range(runs))
        result.update({f"{variant}_20": small, f"{variant}_200": large})
    return result


# --------------------------------------------------------------------------- main


def _verdict(value: float, target: float) -> str:
    return f"<= {target:g} {'ok' if value <= target else 'MISSED'}"


async def _timing_parts(paths: Sequence[Path], runs: int) -> tuple[dict[str, float], ...]:
    return await bench_body(paths, runs), await bench_lag(paths, runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs")
    parser.add_argument(
        "--warm-heap",
        action="store_true",
        help="re-run under glibc settings that keep freed memory (no page faults after "
        "warm-up): measures the code rather than the machine's page-fault cost",
    )
    parser.add_argument("--rss-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="client", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        _rss_child(args.rss_child, args.variant)
        return
    if args.warm_heap and _WARM_HEAP_ENV.keys() - os.environ.keys():
        argv = [sys.executable, __file__, *sys.argv[1:]]
        os.execve(sys.executable, argv, {**os.environ, **_WARM_HEAP_ENV})
    runs = 5 if args.quick else 15
    paths = full_size_jpegs()
    sizes = ", ".join(f"{path.stat().st_size:,}" for path in paths)
    heap = "warm heap (glibc never trims)" if args.warm_heap else "default malloc"
    print(
        f"{interpreter()}, {os.cpu_count()} CPUs, stage threads "
        f"{_stage_threads()}, {heap}; inputs {sizes} bytes"
    )
    memory = bench_memory(1 if args.quick else 3)  # first: while this process is small
    body, lag = asyncio.run(_timing_parts(paths, runs))
    headers = bench_headers(max(3, runs // 3))
    print(
        f"{body['mb']:.1f} MB of JPEG per request; medians of {runs} runs "
        f"(RSS: {1 if args.quick else 3} subprocesses each)\n"
    )
    for row in _rows(body, lag, headers, memory):
        print(f"{row[0]:<44}{row[1]:>11}  {row[2]:<22}{row[3]}")
    print("\nclient = DreamOClient._create: encoded images sent as body parts, never joined;")
    print("joined = the earlier design: parts joined into one buffer in a worker thread.")
    if headers["pillow_wrong"]:
        print("Pillow's lazy open gets these wrong:", ", ".join(headers["pillow_wrong"]))
    if headers["own_wrong"]:
        print("own parser gets these wrong:", ", ".join(headers["own_wrong"]))


def _rows(
    body: dict[str, float], lag: dict[str, float], headers: dict[str, Any], memory: dict[str, float]
) -> list[tuple[str, str, str, str]]:
    base = body["base64_ms"]
    rows = [
        ("(a) bare pybase64 of the 5 images (baseline)", f"{base:.1f} ms", "1.00x", ""),
        ("(a) same, each output dropped at once", f"{body['dropped_ms']:.1f} ms",
         f"{body['dropped_ms'] / base:.2f}x", "(warm memory reused)"),
        ("(a) one empty worker-thread round trip", f"{body['hop_ms']:.2f} ms",
         f"{body['hop_ms'] / base:.2f}x", "(this machine's wake-up cost)"),
    ]  # fmt: skip
    for kind in ("bytes", "paths"):
        for name, label in (("prepare", "prepare_images only"), ("client", "body, client"),
                            ("joined", "body, joined (old)")):  # fmt: skip
            value = body[f"{name}_{kind}_ms"]
            rows.append((f"(a) {label}, from {kind}", f"{value:.1f} ms",
                         f"{value / base:.2f}x", _verdict(value / base, 1.3)))  # fmt: skip
    rows.append(("(b) loop lag, idle loop", f"{lag['idle_ms']:.2f} ms", "", ""))
    for variant in ("client", "joined"):
        value = lag[f"{variant}_ms"]
        rows.append((f"(b) worst loop lag, 4 jobs, {variant}", f"{value:.2f} ms",
                     f"max {lag[f'{variant}_max_ms']:.2f} ms", _verdict(value, 5)))  # fmt: skip
    files = headers["files"]
    rows += [
        ("(c) header check, own parser", f"{headers['own_us']:.1f} µs",
         f"{files - len(headers['own_wrong'])}/{files} right", _verdict(headers["own_us"], 50)),
        ("(c) header check, Pillow lazy open", f"{headers['pillow_us']:.1f} µs",
         f"{files - len(headers['pillow_wrong'])}/{files} right",
         f"{headers['pillow_us'] / headers['own_us']:.1f}x slower"),
    ]  # fmt: skip
    for variant in ("client", "joined"):
        small, large = memory[f"{variant}_20"], memory[f"{variant}_200"]
        rows += [
            (f"(d) peak RSS, 20 jobs, {variant}", f"{small:.0f} MB", "", ""),
            (f"(d) peak RSS, 200 jobs, {variant}", f"{large:.0f} MB", f"{large / small:.2f}x",
             _verdict(large / small, 1.3)),
        ]  # fmt: skip
    return rows


if __name__ == "__main__":
    main()

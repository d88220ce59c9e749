"""The only async part of the image stage: fetch, hop to a worker thread, encode.

:func:`prepare_images` runs inside the job's slot. URLs alone are passed
through as ``image_urls`` (no download). Otherwise it downloads the URL inputs
concurrently, then in *one* worker thread reads files, checks each image by its
bytes (:func:`~dreamo_async.images.checks.inspect_image`) and base64-encodes it
with pybase64, which releases the GIL, so the event loop keeps running. Small
in-memory inputs (bytes-likes of at most ``INLINE_MAX_BYTES`` in all) are checked
and encoded on the loop: microseconds of work, cheaper than the thread hop.

Memory: a :class:`PreparedImages` is the only holder of a job's encoded images;
the client drops it as soon as the request body exists. Every instance is
tracked weakly, so the client's statistics (and tests) can count the live ones
with :func:`live_payload_count` instead of measuring RSS.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import sys
import threading
import warnings
import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import Final

import anyio
import attrs

from ..errors import DreamOWarning, ImageError
from ..limits import DEFAULT_LIMITS, Limits
from .checks import ImageInfo, check_limits, inspect_image, too_large
from .classify import ImageSource, image_error
from .read import load
from .slices import encode_pieces, yield_cpu

__all__ = [
    "FIT_MAX_BYTES",
    "INLINE_MAX_BYTES",
    "Fetch",
    "PreparedImages",
    "check_limiter",
    "live_payload_count",
    "prepare_images",
    "prepare_inline",
    "stage_limiter",
    "warm_up_stage",
]


#: ``(url, max_bytes) -> bytes``: a streamed download capped at ``max_bytes``, from the client.
Fetch = Callable[[str, int], Awaitable[bytes]]

#: Largest input read (or downloaded) in ``fit`` mode, which exists to shrink big files.
FIT_MAX_BYTES: Final = 100_000_000
#: The image stage's worker-thread limiter of each event loop (see stage_limiter).
_LIMITERS: Final[weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, anyio.CapacityLimiter]] = (
    weakref.WeakKeyDictionary()
)
#: The path checks' worker-thread limiter of each event loop (see check_limiter).
_CHECK_LIMITERS: Final[
    weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, anyio.CapacityLimiter]
] = weakref.WeakKeyDictionary()


class _LiveRef(weakref.ref):  # type: ignore[type-arg]
    """A weak reference hashed by identity (a PreparedImages' own hash would read its
    megabytes of base64); made and dropped by C code alone."""

    __slots__ = ()
    __hash__ = object.__hash__
    __eq__ = object.__eq__


#: One weak reference per live PreparedImages; each removes itself when its target goes.
_LIVE: Final[set[_LiveRef]] = set()


@attrs.frozen(slots=False)  # one per job: dict init is twice as fast (and weakref-able)
class PreparedImages:
    """The images of one request, ready for the wire: ``base64`` or ``urls``, never both."""

    #: ASCII base64 of each image file, in input order (sent as ``binary_data_base64``),
    #: each as pieces whose concatenation is the image's base64 (a large image is
    #: encoded a piece at a time, and the body sends the pieces as they are).
    base64_pieces: tuple[tuple[bytes, ...], ...] = ()
    #: The inputs, when all are http(s) URLs (sent as ``image_urls``, never downloaded).
    urls: tuple[str, ...] = ()
    #: Header facts per image (``None`` for URLs the service fetches itself).
    infos: tuple[ImageInfo | None, ...] = ()

    @property
    def base64(self) -> tuple[bytes, ...]:
        """The base64 of each image in one ``bytes`` (joining a large one's pieces copies it)."""
        return tuple(p[0] if len(p) == 1 else b"".join(p) for p in self.base64_pieces)


def live_payload_count() -> int:
    """How many :class:`PreparedImages` are alive: the memory bound tests count these."""
    return len(_LIVE)


def _track(prepared: PreparedImages) -> PreparedImages:
    _LIVE.add(_LiveRef(prepared, _LIVE.discard))
    return prepared


# --------------------------------------------------------------------------- prepare


async def prepare_images(
    sources: Sequence[ImageSource],
    *,
    limits: Limits = DEFAULT_LIMITS,
    fetch: Fetch | None = None,
    fit: bool = False,
) -> PreparedImages:
    """Read, check and encode the images of one request; call it inside the job's slot.

    * Only URLs: returned as ``urls``, with no I/O (the service fetches them;
      ``fit`` does not apply).
    * Otherwise: URL inputs are downloaded concurrently with ``fetch`` (capped
      at the size limit), then one worker thread (under :func:`stage_limiter`)
      reads, checks, optionally fits (``fit=True``, needs Pillow) and
      base64-encodes every image, in order. Cancelling waits for that thread,
      which takes milliseconds. Small in-memory inputs skip the thread.

    Advisory warnings (aspect ratio with ``CheckPolicy.WARN``) are emitted here,
    on the event loop's thread, as :class:`DreamOWarning` (``warnings`` filters
    are not thread-safe, so the thread only collects their texts).
    """
    if not fit:
        inline = prepare_inline(sources, limits)
        if inline is not None:
            return inline
    return await prepare_slow(sources, limits, fetch, fit)


async def prepare_slow(
    sources: Sequence[ImageSource], limits: Limits, fetch: Fetch | None, fit: bool
) -> PreparedImages:
    """:func:`prepare_images` for what :func:`prepare_inline` does not take (it returned
    None, or ``fit``): URLs alone pass through; anything else goes to the worker thread."""
    if sources and all(source.is_url for source in sources):
        urls = tuple(str(source.value) for source in sources)
        return _track(PreparedImages(urls=urls, infos=(None,) * len(urls)))
    cap = _read_cap(limits, fit)
    downloaded = await _fetch_all([s for s in sources if s.is_url], fetch, cap)
    encoded, infos, notes = await anyio.to_thread.run_sync(
        _encode_all, sources, downloaded, limits, fit, limiter=stage_limiter()
    )
    if notes:
        _warn(notes)
    return _track(PreparedImages(base64_pieces=encoded, infos=infos))


def prepare_inline(sources: Sequence[ImageSource], limits: Limits) -> PreparedImages | None:
    """:func:`prepare_images` for small in-memory inputs, on the calling thread; else None.

    A thread hop costs more than checking and encoding a few KB (and makes the loop's
    thread wait for the GIL), so bytes-likes of at most ``INLINE_MAX_BYTES`` in all
    are done here, with no coroutine (``fit`` mode never comes here).
    """
    total = 0
    for source in sources:
        if source.kind != "bytes":
            return None
        value = source.value
        total += len(value) if type(value) is bytes else memoryview(value).nbytes  # type: ignore[arg-type]
        if total > INLINE_MAX_BYTES:
            return None
    encoded, infos, notes = _encode_all(sources, {}, limits, False)
    if notes:
        _warn(notes)
    return _track(PreparedImages(base64_pieces=encoded, infos=infos))


def _warn(notes: list[str]) -> None:
    """Emit advisory texts as :class:`DreamOWarning`, attributed to the first caller
    outside this package: the user's line, whichever call of theirs led here
    (``prepare_images``, ``generate``, ...) and however many of our frames lie between.

    A coroutine of ours that the event loop runs as a task (``generate_many``'s jobs)
    has no caller of the user's on its stack: the warning then points at its frame.
    Our own walk, not ``warnings.warn(skip_file_prefixes=...)``: that needs Python 3.12
    (we support 3.11), and it would walk on into asyncio's frames for such a task.
    """
    level = 2  # warnings.warn counts from 1, this frame; 2 is our caller
    frame = sys._getframe(1)
    while frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        outer = frame.f_back
        if outer is None or (
            frame.f_code.co_flags & _ASYNC_CODE and not outer.f_code.co_flags & _ASYNC_CODE
        ):
            break  # awaited by nothing: the loop (a task) runs it
        frame = outer
        level += 1
    for text in notes:
        warnings.warn(text, DreamOWarning, stacklevel=level)


#: This package's directory (``_warn`` skips the frames of its files).
_PACKAGE_DIR: Final = os.path.dirname(os.path.dirname(__file__)) + os.sep
#: Code flags of frames that can await: a coroutine's caller is one of these, or the loop.
_ASYNC_CODE: Final = inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR


#: In-memory images up to this many bytes in all are checked and encoded on the loop.
INLINE_MAX_BYTES: Final = 256 * 1024


class _EncodedCache:
    """Header facts and base64 of small ``bytes`` inputs, by the identity of the object.

    A bulk run sends the same reference images with prompt after prompt; an
    immutable ``bytes`` object cannot change, so it is read and encoded once. The
    facts kept (:class:`ImageInfo`) do not depend on the limits: every use checks
    them against its own. Only images of at most ``INLINE_MAX_BYTES`` are kept,
    at most ``max_entries`` and ``max_bytes`` of them in all, the oldest entries
    going first (an image evicted while still in use is encoded once more and kept
    again), so the cache holds a few MB at worst. Each entry keeps its ``bytes`` alive, so an id
    is never reused while it is a key. A lock: worker threads use it too.
    """

    def __init__(self, max_entries: int = 64, max_bytes: int = 4 * 1024 * 1024) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: dict[int, tuple[bytes, ImageInfo, tuple[bytes, ...]]] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, value: bytes) -> tuple[ImageInfo, tuple[bytes, ...]] | None:
        entry = self._entries.get(id(value))
        if entry is None or entry[0] is not value:
            return None
        return entry[1], entry[2]

    def put(self, value: bytes, info: ImageInfo, encoded: tuple[bytes, ...]) -> None:
        size = len(value)
        if size > INLINE_MAX_BYTES:
            return
        with self._lock:
            if id(value) in self._entries:
                return
            self._entries[id(value)] = (value, info, encoded)
            self._bytes += size
            while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
                oldest = next(iter(self._entries))
                self._bytes -= len(self._entries.pop(oldest)[0])

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)


#: The process's cache of checked and encoded small ``bytes`` inputs (see _EncodedCache).
ENCODED_CACHE: Final = _EncodedCache()


def stage_limiter() -> anyio.CapacityLimiter:
    """The limiter of the image stage's worker threads, one per event loop.

    Encoding is CPU- and memory-bound work whose C parts release the GIL, so
    several jobs could encode at once; but with as many busy threads as cores
    the event loop's thread waits for a core (and for the GIL between the C
    calls) and its timers run late. Leaving one core to the loop keeps the lag
    small (``benchmarks/bench_preprocess.py``) at no cost in throughput, which
    memory bandwidth bounds anyway.
    """
    return _loop_limiter(_LIMITERS, _stage_threads)


def check_limiter() -> anyio.CapacityLimiter:
    """The limiter of the path checks' worker thread (a stat per file), one per event loop.

    anyio's default limiter lets 40 checks run at once, so a burst of jobs (50
    requests reaching a web app together) started a worker thread per job, each
    start waiting on the event loop for the new thread to run. One at a time, the
    checks share one thread, each taking microseconds.
    """
    return _loop_limiter(_CHECK_LIMITERS, lambda: 1)


def _loop_limiter(
    limiters: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, anyio.CapacityLimiter],
    tokens: Callable[[], int],
) -> anyio.CapacityLimiter:
    """The running loop's limiter in ``limiters``, made with ``tokens()`` at first use
    (an anyio limiter belongs to one event loop)."""
    loop = asyncio.get_running_loop()
    limiter = limiters.get(loop)
    if limiter is None:
        limiter = limiters[loop] = anyio.CapacityLimiter(tokens())
    return limiter


async def warm_up_stage() -> None:
    """Load anyio's worker-thread machinery and start one stage thread, now.

    Done lazily, the first job of a process would pay it on the event loop: the
    import of anyio's asyncio backend (tens of milliseconds) and a thread start,
    a stall in the first request a web app serves. The client calls this when it
    is entered; later calls cost one thread hop.
    """
    await anyio.to_thread.run_sync(_nothing, limiter=stage_limiter())


def _nothing() -> None:
    """The warm-up's work: none (starting the thread is the point)."""


def _stage_threads() -> int:
    """Usable cores minus one for the event loop, between 1 and 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cores = os.cpu_count() or 2
    return max(1, min(cores - 1, 8))


def _read_cap(limits: Limits, fit: bool) -> int:
    """Most bytes worth reading: the limit, or more in fit mode (which shrinks big files)."""
    return max(limits.max_image_bytes, FIT_MAX_BYTES) if fit else limits.max_image_bytes


async def _fetch_all(
    urls: Sequence[ImageSource], fetch: Fetch | None, cap: int
) -> dict[int, bytes]:
    """Download every URL input concurrently; the first failure (by index) cancels the rest."""
    if not urls:
        return {}
    if fetch is None:
        raise image_error(
            urls[0].index,
            urls[0].label,
            "is a URL mixed with local images, so it must be downloaded, "
            "and no downloader was given",
        )
    tasks = [asyncio.ensure_future(_fetch_one(fetch, source, cap)) for source in urls]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for task in tasks:
        if not task.cancelled() and (exc := task.exception()) is not None:
            raise exc
    return {source.index: task.result() for source, task in zip(urls, tasks, strict=True)}


async def _fetch_one(fetch: Fetch, source: ImageSource, cap: int) -> bytes:
    try:
        data = await fetch(str(source.value), cap)
    except ImageError:
        raise
    except Exception as exc:  # any failure of the user's input download is about this image
        raise image_error(
            source.index, source.label, f"could not be downloaded (limit {cap:,} bytes): {exc}"
        ) from exc
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"fetch returned {type(data).__name__}, not bytes")
    return bytes(data) if not isinstance(data, bytes) else data


def _encode_all(
    sources: Sequence[ImageSource], downloaded: dict[int, bytes], limits: Limits, fit: bool
) -> tuple[tuple[tuple[bytes, ...], ...], tuple[ImageInfo | None, ...], list[str]]:
    """Worker-thread body: read, check and base64 each image, holding one raw file at a time.

    Reads and encodes go a piece at a time, the CPU yielded after each (slices.py):
    a woken event-loop thread on this thread's core waits for no long step.
    """
    cap = _read_cap(limits, fit)
    encoded: list[tuple[bytes, ...]] = []
    infos: list[ImageInfo | None] = []
    notes: list[str] = []
    for source in sources:
        value = source.value
        if type(value) is bytes and not fit:
            hit = ENCODED_CACHE.get(value)
            if hit is not None:
                info, cached = hit
                note = check_limits(info, source.index, source.label, limits)
                encoded.append(cached)
                infos.append(info)
                if note:
                    notes.append(note)
                continue
        data = downloaded.pop(source.index) if source.is_url else load(source, cap, limits, fit)
        yield_cpu()
        if len(data) > cap:  # a download from a lax fetch
            raise image_error(source.index, source.label, too_large(len(data), cap, limits, fit))
        if fit:
            from .fit import fit_image  # the optional Pillow extra

            data = fit_image(data, index=source.index, source=source.label, limits=limits)
        info, warned = inspect_image(data, index=source.index, source=source.label, limits=limits)
        encoded.append(encode_pieces(data))
        yield_cpu()
        infos.append(info)
        notes.extend(warned)
        if type(value) is bytes and not fit:
            ENCODED_CACHE.put(value, info, encoded[-1])
        del data
    return tuple(encoded), tuple(infos), notes

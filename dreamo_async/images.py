"""The image stage: from what users pass in ``images=[...]`` to what the service accepts.

Two steps, split so that queued jobs hold nothing but the user's own objects:

1. :func:`classify_images` runs when a request is built. It only looks at the
   Python objects (no I/O) and refuses what can never work: an ``int``, a
   ``file:`` URL, a malformed data URI, empty bytes, a text-mode file.
2. :func:`prepare_images` runs inside the job's slot. URLs alone are passed
   through as ``image_urls`` (no download). Otherwise it downloads the URL
   inputs concurrently, then in *one* worker thread reads files, checks each
   image by its bytes (:func:`inspect_image`: format, size, resolution and
   aspect ratio from the header) and base64-encodes it with pybase64, which
   releases the GIL, so the event loop keeps running. Small in-memory inputs
   (bytes-likes of at most ``INLINE_MAX_BYTES`` in all) are checked and encoded
   on the loop: microseconds of work, cheaper than the thread hop.

Memory: a :class:`PreparedImages` is the only holder of a job's encoded images;
the client drops it as soon as the request body exists. Every instance is
tracked weakly, so tests can assert the bound with :func:`live_payload_count`
instead of measuring RSS. Raw file bytes never leave the worker thread: files
are read into a per-thread reusable buffer, one image at a time.

Which JPEG and PNG variants pass is decided in :mod:`dreamo_async._imageheaders`.
EXIF orientation: the resolution check uses the stored size (what a decoder
allocates), the aspect check the displayed size (what the model and the user
see). With the documented limits both checks are symmetric, so a rotation never
changes a verdict; the distinction only matters for custom asymmetric limits.
"""

from __future__ import annotations

import asyncio
import binascii
import errno
import inspect
import io
import os
import stat
import sys
import threading
import warnings
import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import BinaryIO, Final, Literal
from urllib.parse import urlsplit

import anyio
import attrs
import pybase64

from ._imageheaders import HeaderError, read_header, sniff_format
from ._netguard import display_url
from .errors import DreamOWarning, ImageError
from .limits import DEFAULT_LIMITS, CheckPolicy, Limits

__all__ = [
    "FIT_MAX_BYTES",
    "Fetch",
    "ImageInfo",
    "ImageInput",
    "ImageSource",
    "PreparedImages",
    "check_local_image",
    "check_paths_readable",
    "classify_images",
    "inspect_image",
    "live_payload_count",
    "prepare_images",
    "sniff_format",
    "stage_limiter",
]

#: What users may pass in ``images=[...]``.
ImageInput = str | os.PathLike[str] | bytes | bytearray | memoryview | BinaryIO
#: ``(url, max_bytes) -> bytes``: a streamed download capped at ``max_bytes``, from the client.
Fetch = Callable[[str, int], Awaitable[bytes]]
SourceKind = Literal["path", "bytes", "file", "data_uri", "url"]

#: Largest input read (or downloaded) in ``fit`` mode, which exists to shrink big files.
FIT_MAX_BYTES: Final = 100_000_000
#: Schemes refused even without ``//`` (``javascript:x``); other ``scheme://`` too.
_REFUSED_SCHEMES: Final = frozenset(
    {
        "file",
        "ftp",
        "ftps",
        "sftp",
        "javascript",
        "vbscript",
        "blob",
        "about",
        "mailto",
        "s3",
        "gs",
        "ws",
        "wss",
    }
)
#: Strings that start like base64 of a JPEG or PNG: a user passed encoded data as a "path".
_BASE64_IMAGE_STARTS: Final = ("/9j/", "iVBORw0KGgo")
#: The image stage's worker-thread limiter of each event loop (see stage_limiter).
_LIMITERS: Final[weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, anyio.CapacityLimiter]] = (
    weakref.WeakKeyDictionary()
)
#: Per worker thread, the reusable read buffer (only for limits up to _BUFFER_MAX).
_THREAD_BUFFERS: Final = threading.local()
_BUFFER_MAX: Final = 16_000_000


class _LiveRef(weakref.ref):  # type: ignore[type-arg]
    """A weak reference hashed by identity (a PreparedImages' own hash would read its
    megabytes of base64); made and dropped by C code alone."""

    __slots__ = ()
    __hash__ = object.__hash__
    __eq__ = object.__eq__


#: One weak reference per live PreparedImages; each removes itself when its target goes.
_LIVE: Final[set[_LiveRef]] = set()


@attrs.frozen(slots=False)  # one per image per job: dict init is twice as fast
class ImageSource:
    """One input image, classified without I/O. ``label`` names it in errors."""

    index: int
    kind: SourceKind
    #: The user's object, read only when the job runs.
    value: object = attrs.field(eq=False, repr=False)
    #: File name, ``<bytes 1234 B>``, ``<BytesIO>``, URL host + path, or ``<data URI>``.
    label: str

    @property
    def is_url(self) -> bool:
        """Whether the service may fetch this image itself (an http(s) URL)."""
        return self.kind == "url"


@attrs.frozen
class ImageInfo:
    """What the header says about an accepted image (``width``/``height`` as stored)."""

    format: Literal["jpeg", "png"]
    width: int
    height: int
    size: int
    #: EXIF orientation 1-8; 5-8 mean the image is shown rotated by 90 degrees.
    orientation: int = 1

    @property
    def displayed_size(self) -> tuple[int, int]:
        """``(width, height)`` as a viewer shows the image, after EXIF rotation."""
        if self.orientation >= 5:
            return self.height, self.width
        return self.width, self.height


@attrs.frozen(slots=False)  # one per job: dict init is twice as fast (and weakref-able)
class PreparedImages:
    """The images of one request, ready for the wire: ``base64`` or ``urls``, never both."""

    #: ASCII base64 of each image file, in input order (sent as ``binary_data_base64``).
    base64: tuple[bytes, ...] = ()
    #: The inputs, when all are http(s) URLs (sent as ``image_urls``, never downloaded).
    urls: tuple[str, ...] = ()
    #: Header facts per image (``None`` for URLs the service fetches itself).
    infos: tuple[ImageInfo | None, ...] = ()


def live_payload_count() -> int:
    """How many :class:`PreparedImages` are alive: the memory bound tests count these."""
    return len(_LIVE)


def _track(prepared: PreparedImages) -> PreparedImages:
    _LIVE.add(_LiveRef(prepared, _LIVE.discard))
    return prepared


# --------------------------------------------------------------------------- classify


def classify_images(images: Sequence[object]) -> tuple[ImageSource, ...]:
    """Classify each input by its Python type, with no I/O; refuse what can never be an image.

    A ``str`` is a URL when it starts with ``http://`` or ``https://``, a data
    URI when it starts with ``data:``, and a path otherwise (a string like
    ``file:///x`` or ``ftp://x`` is refused rather than looked up as a file).
    """
    return tuple(_classify(index, item) for index, item in enumerate(images))


def _classify(index: int, item: object) -> ImageSource:
    if type(item) is bytes:  # the common case first
        return _classify_bytes(index, item)
    if isinstance(item, ImageSource):
        return attrs.evolve(item, index=index)
    if isinstance(item, _BYTES_LIKE):
        return _classify_bytes(index, item)
    if isinstance(item, str):
        return _classify_str(index, item)
    if isinstance(item, os.PathLike):
        path = os.fspath(item)
        name = os.path.basename(path) or path
        return ImageSource(index, "path", item, name if isinstance(name, str) else repr(name))
    if isinstance(item, io.TextIOBase):
        raise _error(index, _file_label(item), "is a text-mode file; open it with 'rb'")
    if callable(getattr(item, "read", None)):
        return ImageSource(index, "file", item, _file_label(item))
    raise _error(
        index,
        type(item).__name__,
        f"has the unsupported type {type(item).__name__}; pass a path, bytes, "
        "a binary file object, a data URI or an http(s) URL",
    )


#: Tuples, not unions, in isinstance: a union is rebuilt at every call.
_BYTES_LIKE: Final = (bytes, bytearray, memoryview)


def _classify_bytes(index: int, item: bytes | bytearray | memoryview) -> ImageSource:
    size = item.nbytes if isinstance(item, memoryview) else len(item)
    label = f"<bytes {size} B>"
    if size == 0:
        raise _error(index, label, "is empty (0 bytes)")
    return ImageSource(index, "bytes", item, label)


def _classify_str(index: int, item: str) -> ImageSource:
    lowered = item[:16].lower()
    if lowered.startswith(("http://", "https://")):
        label = _url_label(item)
        _check_sendable(index, label, item)
        if not urlsplit(item).hostname:
            raise _error(index, label, "is a URL without a host")
        return ImageSource(index, "url", item, label)
    if lowered.startswith("data:"):
        _check_sendable(index, "<data URI>", item)
        _check_data_uri(index, item)
        return ImageSource(index, "data_uri", item, "<data URI>")
    scheme, sep, rest = item.partition(":")
    if (
        sep
        and len(scheme) > 1
        and scheme.replace("+", "").replace("-", "").isalnum()
        and (rest.startswith("//") or scheme.lower() in _REFUSED_SCHEMES)
    ):
        raise _error(
            index,
            _url_label(item),
            f"is a {scheme.lower()}: URL; only http:// and https:// URLs are accepted "
            "(or a local path, bytes, a file object, a data URI)",
        )
    if not item:
        raise _error(index, "''", "is an empty path")
    if len(item) > 1024 and item.startswith(_BASE64_IMAGE_STARTS):
        raise _error(
            index,
            "<base64 text>",
            "looks like base64 text, not a path; pass the decoded bytes or a data URI "
            "(data:image/jpeg;base64,...)",
        )
    return ImageSource(index, "path", item, os.path.basename(item) or item)


def _check_sendable(index: int, label: str, text: str) -> None:
    """Refuse text that cannot be sent as UTF-8 (a lone surrogate): the create would crash.

    Paths are not checked: a file name may hold surrogate escapes and still open.
    """
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError as exc:
            raise _error(
                index, label, f"holds a character that cannot be sent ({exc.reason} at {exc.start})"
            ) from None


def _file_label(item: object) -> str:
    name = getattr(item, "name", None)
    if isinstance(name, str) and name:
        return os.path.basename(name) or name
    return f"<{type(item).__name__}>"


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _url_label(url: str) -> str:
    """Host and path of a URL: no scheme, no user info, no query (signed URLs hide keys there)."""
    return _short(display_url(url, scheme=False))


def _check_data_uri(index: int, uri: str) -> None:
    """Structure only (cheap): the base64 payload is decoded when the job runs."""
    header, sep, payload = uri.partition(",")
    if not sep or not header.lower().endswith(";base64"):
        raise _error(
            index,
            "<data URI>",
            "must be a base64 data URI like data:image/jpeg;base64,/9j/...",
        )
    if not payload.strip():
        raise _error(index, "<data URI>", "has no data after the comma")


def _error(index: int, source: str, text: str) -> ImageError:
    return ImageError(f"image {index} ({source}) {text}", index=index, source=source)


# --------------------------------------------------------------------------- inspect


def inspect_image(
    data: bytes | bytearray | memoryview,
    *,
    index: int,
    source: str,
    limits: Limits = DEFAULT_LIMITS,
) -> tuple[ImageInfo, list[str]]:
    """Check one image by its bytes, without decoding pixels.

    Checks, in the order a user can best act on them: format (by content, never
    by name), file size, header integrity, resolution, aspect ratio. Returns the
    header facts and the advisory texts to emit as :class:`DreamOWarning`
    (returned, not emitted: this runs in a worker thread, and ``warnings``
    filters are not thread-safe). Every refusal is an :class:`ImageError` that
    names the image, the limit and the value.
    """
    size = len(data) if not isinstance(data, memoryview) else data.nbytes
    if size == 0:
        raise _error(index, source, "is empty (0 bytes)")
    head = bytes(data[:512])
    kind = sniff_format(head)
    if kind not in ("JPEG", "PNG"):
        what = kind or f"not a recognisable image (it starts with {head[:8].hex(' ')})"
        raise _error(index, source, f"is {what}; the service accepts JPEG or PNG")
    if size > limits.max_image_bytes:  # before reading the header: the likelier fix
        raise _error(index, source, _too_large(size, limits.max_image_bytes, limits, False))
    try:
        header = read_header(data)
    except HeaderError as exc:
        text = str(exc)
        detail = text if text.startswith("is ") else f"is unusable: {text}"
        raise _error(index, source, detail) from None
    info = ImageInfo(header.format, header.width, header.height, size, header.orientation)
    note = _check_limits(info, index, source, limits)
    return info, [note] if note else []


def _check_limits(info: ImageInfo, index: int, source: str, limits: Limits) -> str | None:
    """Size, resolution and aspect of known header facts against ``limits``: raise, or
    return the advisory text. For a fresh image and for one from ENCODED_CACHE alike."""
    if info.size > limits.max_image_bytes:
        raise _error(index, source, _too_large(info.size, limits.max_image_bytes, limits, False))
    _check_resolution(info.width, info.height, index, source, limits)
    return _check_aspect(info, index, source, limits)


def _check_resolution(width: int, height: int, index: int, source: str, limits: Limits) -> None:
    if width > limits.max_image_width or height > limits.max_image_height:
        raise _error(
            index,
            source,
            f"is {width} x {height} pixels; the limit is "
            f"{limits.max_image_width} x {limits.max_image_height}",
        )


def _check_aspect(info: ImageInfo, index: int, source: str, limits: Limits) -> str | None:
    """Refuse (ERROR) or describe (WARN) an aspect ratio outside the recommended range."""
    if limits.aspect_policy is CheckPolicy.OFF:
        return None
    width, height = info.displayed_size
    ratio = width / height
    if limits.min_aspect_ratio <= ratio <= limits.max_aspect_ratio:
        return None
    shown = " as displayed" if info.orientation >= 5 else ""
    text = (
        f"image {index} ({source}) has an aspect ratio of {ratio:.2f} ({width} x {height}"
        f"{shown}); the service recommends {limits.min_aspect_ratio:.2f} (9:16) to "
        f"{limits.max_aspect_ratio:.2f} (16:9) and may give poor results or fail"
    )
    if limits.aspect_policy is CheckPolicy.ERROR:
        raise ImageError(
            text + "; to send it anyway use Limits(aspect_policy='warn')",
            index=index,
            source=source,
        )
    return text


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
    return await _prepare_slow(sources, limits, fetch, fit)


async def _prepare_slow(
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
    return _track(PreparedImages(base64=encoded, infos=infos))


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
    return _track(PreparedImages(base64=encoded, infos=infos))


def _warn(notes: list[str]) -> None:
    """Emit advisory texts as :class:`DreamOWarning`, attributed to the first caller
    outside this package: the user's line, whichever call of theirs led here
    (``prepare_images``, ``generate``, ...) and however many of our frames lie between.

    A coroutine of ours that the event loop runs as a task (``generate_many``'s jobs)
    has no caller of the user's on its stack: the warning then points at its frame.
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
_PACKAGE_DIR: Final = os.path.dirname(__file__) + os.sep
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
        self._entries: dict[int, tuple[bytes, ImageInfo, bytes]] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, value: bytes) -> tuple[ImageInfo, bytes] | None:
        entry = self._entries.get(id(value))
        if entry is None or entry[0] is not value:
            return None
        return entry[1], entry[2]

    def put(self, value: bytes, info: ImageInfo, encoded: bytes) -> None:
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
    loop = asyncio.get_running_loop()
    limiter = _LIMITERS.get(loop)
    if limiter is None:
        limiter = _LIMITERS[loop] = anyio.CapacityLimiter(_stage_threads())
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
        raise _error(
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
        raise _error(
            source.index, source.label, f"could not be downloaded (limit {cap:,} bytes): {exc}"
        ) from exc
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"fetch returned {type(data).__name__}, not bytes")
    return bytes(data) if not isinstance(data, bytes) else data


def _encode_all(
    sources: Sequence[ImageSource], downloaded: dict[int, bytes], limits: Limits, fit: bool
) -> tuple[tuple[bytes, ...], tuple[ImageInfo | None, ...], list[str]]:
    """Worker-thread body: read, check and base64 each image, holding one raw file at a time."""
    cap = _read_cap(limits, fit)
    encoded: list[bytes] = []
    infos: list[ImageInfo | None] = []
    notes: list[str] = []
    for source in sources:
        value = source.value
        if type(value) is bytes and not fit:
            hit = ENCODED_CACHE.get(value)
            if hit is not None:
                info, cached = hit
                note = _check_limits(info, source.index, source.label, limits)
                encoded.append(cached)
                infos.append(info)
                if note:
                    notes.append(note)
                continue
        data = downloaded.pop(source.index) if source.is_url else _load(source, cap, limits, fit)
        if len(data) > cap:  # a download from a lax fetch
            raise _error(source.index, source.label, _too_large(len(data), cap, limits, fit))
        if fit:
            from ._fit import fit_image  # the optional Pillow extra

            data = fit_image(data, index=source.index, source=source.label, limits=limits)
        info, warned = inspect_image(data, index=source.index, source=source.label, limits=limits)
        encoded.append(pybase64.b64encode(data))
        infos.append(info)
        notes.extend(warned)
        if type(value) is bytes and not fit:
            ENCODED_CACHE.put(value, info, encoded[-1])
        del data
    return tuple(encoded), tuple(infos), notes


def check_paths_readable(sources: Sequence[ImageSource]) -> None:
    """Refuse a path input that does not exist, is a directory or cannot be read.

    A stat and an access check, no read (blocking: call it in a worker thread). The
    client runs it before a job queues, so a typo is reported at once, not when the
    job gets its slot; the full check of the bytes comes when the job runs.
    """
    for source in sources:
        if source.kind != "path":
            continue
        path = source.value
        try:
            if stat.S_ISDIR(os.stat(path).st_mode):  # type: ignore[arg-type]  # str/PathLike
                raise IsADirectoryError(path)
            if not os.access(path, os.R_OK):  # type: ignore[arg-type]
                raise PermissionError(errno.EACCES, "permission denied")
        except OSError as exc:
            raise _os_error(source, exc) from None


def _os_error(source: ImageSource, exc: OSError) -> ImageError:
    """An ImageError for a file that could not be opened or read."""
    if isinstance(exc, FileNotFoundError):
        return _error(source.index, source.label, "does not exist (no such file)")
    if isinstance(exc, IsADirectoryError):
        return _error(source.index, source.label, "is a directory, not a file")
    reason = exc.strerror or str(exc) or type(exc).__name__
    return _error(source.index, source.label, f"could not be read: {reason}")


def check_local_image(source: ImageSource, limits: Limits = DEFAULT_LIMITS) -> ImageInfo:
    """Read and check one local image as a job will (blocking I/O: not on the loop).

    For callers that vet inputs ahead of time (``dreamo batch`` checks a whole jobs
    file before sending anything): the same reader, cap and messages as the run.
    """
    data = _load(source, limits.max_image_bytes, limits, False)
    info, _ = inspect_image(data, index=source.index, source=source.label, limits=limits)
    return info


# --------------------------------------------------------------------------- reading


class _Oversized(Exception):
    """A source holds more than the read cap; ``size`` is exact when known, else None."""

    def __init__(self, size: int | None) -> None:
        super().__init__(size)
        self.size = size


def _too_large(size: int | None, cap: int, limits: Limits, fit: bool) -> str:
    if fit:
        return f"is larger than {cap:,} bytes, the most fit mode reads"
    shown = f"is {size:,} bytes" if size is not None else "is larger than that"
    return f"{shown}; the limit is {limits.max_image_bytes:,} bytes (Limits.max_image_bytes)"


def _load(source: ImageSource, cap: int, limits: Limits, fit: bool) -> bytes | memoryview:
    """The bytes of a local source, never reading more than ``cap + 1`` of them."""
    try:
        if source.kind == "bytes":
            return _as_view(source.value)
        if source.kind == "data_uri":
            return _decode_data_uri(str(source.value), source, cap)
        if source.kind == "path":
            return _read_path(source.value, cap)
        return _read_file_object(source.value, source, cap)
    except _Oversized as exc:
        raise _error(source.index, source.label, _too_large(exc.size, cap, limits, fit)) from None
    except (FileNotFoundError, IsADirectoryError) as exc:
        raise _os_error(source, exc) from None
    except OSError as exc:
        raise _os_error(source, exc) from exc


def _as_view(value: object) -> bytes | memoryview:
    """Bytes as they are; a bytearray or memoryview without copying (when contiguous)."""
    if isinstance(value, bytes):
        return value
    view = memoryview(value)  # type: ignore[arg-type]  # classify let only bytes-likes in
    if not view.c_contiguous:
        return view.tobytes()
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _read_path(path: object, cap: int) -> bytes | memoryview:
    """Read a file, refusing it by its size on disk, before reading, when that is too large.

    The bytes land in this worker thread's reusable buffer (see :func:`_thread_buffer`).
    """
    with open(path, "rb", buffering=0) as handle:  # type: ignore[call-overload]  # str/PathLike
        size = os.fstat(handle.fileno()).st_size
        if size > cap:  # 0 for pipes and devices, which the capped read then bounds
            raise _Oversized(size)
        if cap > _BUFFER_MAX:
            return _read_capped(handle, cap)
        view = _thread_buffer(cap + 1)
        total = 0
        while total <= cap:
            count = handle.readinto(view[total : cap + 1])
            if not count:
                break
            total += count
        if total > cap:
            raise _Oversized(None)
        return view[:total]


def _thread_buffer(size: int) -> memoryview:
    """A buffer of at least ``size`` bytes owned by the calling worker thread, reused.

    Reading into it instead of into a new ``bytes`` per file saves allocating
    (and page-faulting in) 23.5 MB per full-size request. Its contents are only
    valid until the same thread reads the next file; nothing that outlives the
    worker-thread call refers to it (the base64 output is a new object). It is
    never resized, only replaced, so a stale view (in a traceback) cannot break it.
    """
    buffer: bytearray | None = getattr(_THREAD_BUFFERS, "buffer", None)
    if buffer is None or len(buffer) < size:
        buffer = bytearray(size)
        _THREAD_BUFFERS.buffer = buffer
    return memoryview(buffer)


def _read_file_object(handle: object, source: ImageSource, cap: int) -> bytes:
    """Read from the current position, then restore it, so a request can be prepared again.

    Under the object's lock: jobs sharing one file object read it in turn from worker
    threads, each from the same position, instead of interleaving their reads and seeks.
    """
    with _file_lock(handle):
        start: int | None = None
        seekable = getattr(handle, "seekable", None)
        if callable(seekable) and seekable():
            start = handle.tell()  # type: ignore[attr-defined]
        try:
            data = _read_capped(handle, cap)
        except TypeError as exc:  # read() returned text
            raise _error(source.index, source.label, str(exc)) from None
        finally:
            if start is not None:
                handle.seek(start)  # type: ignore[attr-defined]
    return data


#: One lock per file object being read (weakly held); objects that cannot be weakly
#: referenced share _ANY_FILE_LOCK.
_FILE_LOCKS: Final[weakref.WeakKeyDictionary[object, threading.Lock]] = weakref.WeakKeyDictionary()
_FILE_LOCKS_GUARD: Final = threading.Lock()
_ANY_FILE_LOCK: Final = threading.Lock()


def _file_lock(handle: object) -> threading.Lock:
    with _FILE_LOCKS_GUARD:
        try:
            lock = _FILE_LOCKS.get(handle)
            if lock is None:
                lock = _FILE_LOCKS[handle] = threading.Lock()
        except TypeError:  # not weakly referenceable, or unhashable
            return _ANY_FILE_LOCK
        return lock


def _read_capped(handle: object, cap: int) -> bytes:
    """Read up to ``cap + 1`` bytes, looping over short reads (raw files, pipes, sockets)."""
    read = handle.read  # type: ignore[attr-defined]  # classify checked it exists
    chunks: list[bytes] = []
    total = 0
    while total <= cap:
        chunk = read(cap + 1 - total)
        if chunk is None:
            raise OSError("the file object has no data ready (non-blocking stream?)")
        if isinstance(chunk, str):
            raise TypeError("returned text; open the file in binary mode ('rb')")
        if not chunk:
            break
        chunks.append(bytes(chunk))
        total += len(chunk)
    if total > cap:
        raise _Oversized(None)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _decode_data_uri(uri: str, source: ImageSource, cap: int) -> bytes:
    """Decode the payload, refusing an oversized one from its length alone."""
    payload = uri.partition(",")[2].strip()
    if len(payload) // 4 * 3 > cap + 3:
        raise _Oversized(None)
    try:
        return _b64decode(payload)
    except (binascii.Error, ValueError):
        pass
    # Lenient second try: line breaks (MIME style) and the URL-safe alphabet.
    cleaned = "".join(payload.split())
    try:
        return _b64decode(cleaned, "-_" if ("-" in cleaned or "_" in cleaned) else None)
    except (binascii.Error, ValueError) as exc:
        raise _error(source.index, source.label, f"has invalid base64 data ({exc})") from None


def _b64decode(text: str, altchars: str | None = None) -> bytes:
    decoded: bytes = pybase64.b64decode(text, altchars=altchars, validate=True)
    return decoded

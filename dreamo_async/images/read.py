"""Reading local inputs (paths, bytes-likes, file objects, data URIs) under a byte cap.

Blocking I/O: runs in the image stage's worker thread. Raw file bytes never leave
that thread: files are read into a per-thread reusable buffer, one at a time.
"""

from __future__ import annotations

import binascii
import errno
import mmap
import os
import stat
import threading
import weakref
from collections.abc import Sequence
from typing import Final

import pybase64

from ..errors import ImageError
from ..limits import DEFAULT_LIMITS, Limits
from .checks import ImageInfo, inspect_image, too_large
from .classify import ImageSource, image_error
from .slices import PIECE_BYTES, yield_cpu

__all__ = ["Oversized", "check_local_image", "check_paths_readable", "load"]


#: Per worker thread, the reusable read buffer (only for limits up to _BUFFER_MAX).
_THREAD_BUFFERS: Final = threading.local()
_BUFFER_MAX: Final = 16_000_000


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
        return image_error(source.index, source.label, "does not exist (no such file)")
    if isinstance(exc, IsADirectoryError):
        return image_error(source.index, source.label, "is a directory, not a file")
    reason = exc.strerror or str(exc) or type(exc).__name__
    return image_error(source.index, source.label, f"could not be read: {reason}")


def check_local_image(source: ImageSource, limits: Limits = DEFAULT_LIMITS) -> ImageInfo:
    """Read and check one local image as a job will (blocking I/O: not on the loop).

    For callers that vet inputs ahead of time (``dreamo batch`` checks a whole jobs
    file before sending anything): the same reader, cap and messages as the run.
    """
    data = load(source, limits.max_image_bytes, limits, False)
    info, _ = inspect_image(data, index=source.index, source=source.label, limits=limits)
    return info


# --------------------------------------------------------------------------- reading


class Oversized(Exception):
    """A source holds more than the read cap; ``size`` is exact when known, else None."""

    def __init__(self, size: int | None) -> None:
        super().__init__(size)
        self.size = size


def load(source: ImageSource, cap: int, limits: Limits, fit: bool) -> bytes | memoryview:
    """The bytes of a local source, never reading more than ``cap + 1`` of them."""
    try:
        if source.kind == "bytes":
            return _as_view(source.value)
        if source.kind == "data_uri":
            return _decode_data_uri(str(source.value), source, cap)
        if source.kind == "path":
            return _read_path(source.value, cap)
        return _read_file_object(source.value, source, cap)
    except Oversized as exc:
        raise image_error(
            source.index, source.label, too_large(exc.size, cap, limits, fit)
        ) from None
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

    Read in pieces of ``PIECE_BYTES``, the CPU given up after each (see slices.py).

    The bytes land in this worker thread's reusable buffer (see :func:`_thread_buffer`).
    """
    with open(path, "rb", buffering=0) as handle:  # type: ignore[call-overload]  # str/PathLike
        size = os.fstat(handle.fileno()).st_size
        if size > cap:  # 0 for pipes and devices, which the capped read then bounds
            raise Oversized(size)
        if cap > _BUFFER_MAX:
            return _read_capped(handle, cap)
        view = _thread_buffer(cap + 1)
        total = 0
        while total <= cap:  # a piece at a time (see slices.py)
            count = handle.readinto(view[total : min(total + PIECE_BYTES, cap + 1)])
            if not count:
                break
            total += count
            yield_cpu()
        if total > cap:
            raise Oversized(None)
        return view[:total]


def _thread_buffer(size: int) -> memoryview:
    """A buffer of at least ``size`` bytes owned by the calling worker thread, reused.

    Reading into it instead of into a new ``bytes`` per file saves allocating
    (and page-faulting in) 23.5 MB per full-size request. Its contents are only
    valid until the same thread reads the next file; nothing that outlives the
    worker-thread call refers to it (the base64 output is a new object). It is
    never resized, only replaced, so a stale view (in a traceback) cannot break it.

    An anonymous memory map, not a ``bytearray``: a bytearray zero-fills every page
    at once (3.8 ms for 4.7 MB here, the GIL held), the first job of each thread
    stalling the loop; the map's pages are faulted in as the pieces are read.
    """
    buffer: mmap.mmap | None = getattr(_THREAD_BUFFERS, "buffer", None)
    if buffer is None or len(buffer) < size:
        buffer = mmap.mmap(-1, size)
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
            raise image_error(source.index, source.label, str(exc)) from None
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
        raise Oversized(None)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _decode_data_uri(uri: str, source: ImageSource, cap: int) -> bytes:
    """Decode the payload, refusing an oversized one from its length alone."""
    payload = uri.partition(",")[2].strip()
    if len(payload) // 4 * 3 > cap + 3:
        raise Oversized(None)
    try:
        return _b64decode(payload)
    except (binascii.Error, ValueError):
        pass
    # Lenient second try: line breaks (MIME style) and the URL-safe alphabet.
    cleaned = "".join(payload.split())
    try:
        return _b64decode(cleaned, "-_" if ("-" in cleaned or "_" in cleaned) else None)
    except (binascii.Error, ValueError) as exc:
        raise image_error(source.index, source.label, f"has invalid base64 data ({exc})") from None


def _b64decode(text: str, altchars: str | None = None) -> bytes:
    decoded: bytes = pybase64.b64decode(text, altchars=altchars, validate=True)
    return decoded

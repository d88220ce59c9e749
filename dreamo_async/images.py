"""The image stage: from what users pass in ``images=[...]`` to what the service accepts.

Two steps, split so that queued jobs hold nothing:

1. :func:`classify_images` runs when a request is built: it only looks at the
   Python objects (no I/O) and refuses what can never work (a ``file:`` URL, an
   ``int``, a malformed data URI).
2. :func:`prepare_images` runs inside the job's slot: it downloads URL inputs
   when they are mixed with local ones, then in one worker thread reads files,
   checks each image by its bytes (format, size, resolution from the header,
   aspect ratio) and base64-encodes it with pybase64, which releases the GIL.

Decisions: JPEG means a stream starting with SOI whose frame is baseline,
extended or progressive Huffman (JFIF, EXIF, Adobe/CMYK, 12-bit and MPO files all
qualify: decoders read their primary image); lossless and arithmetic JPEGs are
refused. Any valid PNG is accepted (16-bit, interlaced, APNG: its first frame).
EXIF orientation is ignored on purpose: both the 4096 x 4096 and the 9:16..16:9
checks are symmetric, so a rotation cannot change their verdict.
"""

from __future__ import annotations

import asyncio
import binascii
import os
import warnings
import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, BinaryIO, Final, Literal

import anyio
import attrs
import pybase64

from ._imageheaders import HeaderError, read_dimensions, sniff_format
from .errors import DreamOWarning, ImageError
from .limits import DEFAULT_LIMITS, CheckPolicy, Limits

__all__ = [
    "Fetch",
    "ImageInfo",
    "ImageInput",
    "ImageSource",
    "PreparedImages",
    "classify_images",
    "inspect_image",
    "live_payload_count",
    "prepare_images",
]

ImageInput = str | os.PathLike[str] | bytes | bytearray | memoryview | BinaryIO
#: ``(url, max_bytes) -> bytes``: a capped download, supplied by the client.
Fetch = Callable[[str, int], Awaitable[bytes]]
SourceKind = Literal["path", "bytes", "file", "data_uri", "url"]

_LIVE: Final[weakref.WeakSet[PreparedImages]] = weakref.WeakSet()


@attrs.frozen
class ImageSource:
    """One input image, classified without I/O. ``label`` names it in errors."""

    index: int
    kind: SourceKind
    value: object = attrs.field(eq=False, repr=False)
    label: str

    @property
    def is_url(self) -> bool:
        return self.kind == "url"


@attrs.frozen
class ImageInfo:
    """What the header says about an accepted image."""

    format: Literal["jpeg", "png"]
    width: int
    height: int
    size: int


@attrs.frozen(weakref_slot=True)
class PreparedImages:
    """The images of one request, ready for the wire (exactly one of the two is set)."""

    base64: tuple[bytes, ...] = ()
    urls: tuple[str, ...] = ()
    infos: tuple[ImageInfo | None, ...] = ()


def live_payload_count() -> int:
    """How many :class:`PreparedImages` are alive (the memory-bound tests count them)."""
    return len(_LIVE)


# --------------------------------------------------------------------------- classify


def classify_images(images: Sequence[object]) -> tuple[ImageSource, ...]:
    """Classify each input by its Python type; refuse what can never be an image."""
    return tuple(_classify(index, item) for index, item in enumerate(images))


def _classify(index: int, item: object) -> ImageSource:
    if isinstance(item, ImageSource):
        return attrs.evolve(item, index=index)
    if isinstance(item, bytes | bytearray | memoryview):
        size = item.nbytes if isinstance(item, memoryview) else len(item)
        if size == 0:
            raise ImageError(f"image {index} (<bytes>) is empty", index=index, source="<bytes>")
        return ImageSource(index, "bytes", item, f"<{size} bytes>")
    if isinstance(item, str):
        lowered = item[:16].lower()
        if lowered.startswith(("http://", "https://")):
            return ImageSource(index, "url", item, _url_label(item))
        if lowered.startswith("data:"):
            _check_data_uri(index, item)
            return ImageSource(index, "data_uri", item, "<data URI>")
        scheme = item.split(":", 1)[0] if ":" in item[:12] else ""
        if scheme.isalpha() and len(scheme) > 1:
            raise ImageError(
                f"image {index} ({_short(item)}) has the scheme {scheme}:; only http:// and "
                "https:// URLs (or local paths, bytes, data URIs) are accepted",
                index=index,
                source=_short(item),
            )
        if not item:
            raise ImageError(f"image {index} is an empty path", index=index, source="''")
        return ImageSource(index, "path", item, os.path.basename(item) or item)
    if isinstance(item, os.PathLike):
        path = os.fspath(item)
        label = os.path.basename(path) if isinstance(path, str) else repr(path)
        return ImageSource(index, "path", item, label)
    if hasattr(item, "read"):
        name = getattr(item, "name", None)
        label = os.path.basename(name) if isinstance(name, str) else f"<{type(item).__name__}>"
        return ImageSource(index, "file", item, label)
    raise ImageError(
        f"image {index} is a {type(item).__name__}; pass a path, bytes, a binary file "
        "object, a data URI or an http(s) URL",
        index=index,
        source=type(item).__name__,
    )


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _url_label(url: str) -> str:
    """Host and path of a URL, without its query (signed URLs carry secrets there)."""
    return _short(url.split("?", 1)[0].split("#", 1)[0])


def _check_data_uri(index: int, uri: str) -> None:
    header, sep, _ = uri.partition(",")
    if not sep or not header.lower().endswith(";base64"):
        raise ImageError(
            f"image {index} (<data URI>) must be a base64 data URI (data:image/jpeg;base64,...)",
            index=index,
            source="<data URI>",
        )


# --------------------------------------------------------------------------- inspect


def inspect_image(
    data: bytes | memoryview,
    *,
    index: int,
    source: str,
    limits: Limits = DEFAULT_LIMITS,
) -> tuple[ImageInfo, list[str]]:
    """Check one image by its bytes; return its info and advisory warning texts."""
    name = f"image {index} ({source})"
    size = len(data)
    if size == 0:
        raise ImageError(f"{name} is empty (0 bytes)", index=index, source=source)
    if size > limits.max_image_bytes:
        raise ImageError(
            f"{name} is {size:,} bytes; the limit is {limits.max_image_bytes:,} bytes",
            index=index,
            source=source,
        )
    kind = sniff_format(bytes(data[:512]))
    if kind not in ("JPEG", "PNG"):
        what = f"is {kind}" if kind else "is not a recognisable image"
        raise ImageError(
            f"{name} {what}; the service accepts JPEG or PNG", index=index, source=source
        )
    try:
        width, height = read_dimensions(data, kind)
    except HeaderError as exc:
        raise ImageError(f"{name}: {exc}", index=index, source=source) from None
    if width > limits.max_image_width or height > limits.max_image_height:
        raise ImageError(
            f"{name} is {width} x {height} pixels; the limit is "
            f"{limits.max_image_width} x {limits.max_image_height}",
            index=index,
            source=source,
        )
    notes: list[str] = []
    ratio = width / height
    if not limits.min_aspect_ratio <= ratio <= limits.max_aspect_ratio and (
        limits.aspect_policy is not CheckPolicy.OFF
    ):
        text = (
            f"{name} has an aspect ratio of {width}:{height} ({ratio:.2f}); the service "
            f"recommends 9:16 to 16:9 ({limits.min_aspect_ratio:.2f}-{limits.max_aspect_ratio:.2f})"
        )
        if limits.aspect_policy is CheckPolicy.ERROR:
            raise ImageError(text, index=index, source=source)
        notes.append(text)
    info = ImageInfo(
        format="jpeg" if kind == "JPEG" else "png", width=width, height=height, size=size
    )
    return info, notes


# --------------------------------------------------------------------------- prepare


async def prepare_images(
    sources: Sequence[ImageSource],
    *,
    limits: Limits = DEFAULT_LIMITS,
    fetch: Fetch | None = None,
    fit: bool = False,
) -> PreparedImages:
    """Read, check and encode the images of one request (inside its job slot)."""
    if sources and all(source.is_url for source in sources):
        prepared = PreparedImages(
            urls=tuple(str(s.value) for s in sources), infos=(None,) * len(sources)
        )
        _LIVE.add(prepared)
        return prepared
    downloaded: dict[int, bytes] = {}
    urls = [s for s in sources if s.is_url]
    if urls:
        if fetch is None:
            raise ImageError(
                "URL inputs mixed with local images must be downloaded, and no downloader "
                "was given",
                index=urls[0].index,
                source=urls[0].label,
            )
        fetched = await asyncio.gather(*(_download(fetch, source, limits) for source in urls))
        downloaded = {source.index: data for source, data in zip(urls, fetched, strict=True)}
    encoded, infos, notes = await anyio.to_thread.run_sync(
        _load_check_encode, sources, downloaded, limits, fit
    )
    for text in notes:
        warnings.warn(text, DreamOWarning, stacklevel=2)
    prepared = PreparedImages(base64=encoded, infos=infos)
    _LIVE.add(prepared)
    return prepared


async def _download(fetch: Fetch, source: ImageSource, limits: Limits) -> bytes:
    try:
        return await fetch(str(source.value), limits.max_image_bytes)
    except ImageError:
        raise
    except Exception as exc:
        raise ImageError(
            f"image {source.index} ({source.label}) could not be downloaded: {exc}",
            index=source.index,
            source=source.label,
        ) from exc


def _load_check_encode(
    sources: Sequence[ImageSource], downloaded: dict[int, bytes], limits: Limits, fit: bool
) -> tuple[tuple[bytes, ...], tuple[ImageInfo | None, ...], list[str]]:
    """Worker-thread body: read every image, check it, base64 it."""
    encoded: list[bytes] = []
    infos: list[ImageInfo | None] = []
    notes: list[str] = []
    for source in sources:
        data = downloaded[source.index] if source.is_url else _read(source, limits)
        if fit:
            from ._fit import fit_image  # optional: needs Pillow

            data = fit_image(data, index=source.index, source=source.label, limits=limits)
        info, warned = inspect_image(data, index=source.index, source=source.label, limits=limits)
        notes.extend(warned)
        infos.append(info)
        encoded.append(pybase64.b64encode(data))
    return tuple(encoded), tuple(infos), notes


def _read(source: ImageSource, limits: Limits) -> bytes | memoryview:
    """The bytes of a local source, reading at most one byte past the size limit."""
    cap = limits.max_image_bytes + 1
    name = f"image {source.index} ({source.label})"
    value: Any = source.value
    try:
        if source.kind == "bytes":
            return value if isinstance(value, bytes | memoryview) else bytes(value)
        if source.kind == "data_uri":
            payload = value.partition(",")[2]
            return pybase64.b64decode(payload, validate=True)
        if source.kind == "path":
            with open(value, "rb") as handle:
                return handle.read(cap)
        data = value.read(cap)
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file", index=source.index, source=source.label) from None
    except IsADirectoryError:
        raise ImageError(
            f"{name} is a directory", index=source.index, source=source.label
        ) from None
    except (binascii.Error, ValueError) as exc:
        raise ImageError(
            f"{name}: invalid base64 in the data URI ({exc})",
            index=source.index,
            source=source.label,
        ) from None
    except OSError as exc:
        raise ImageError(
            f"{name} could not be read: {exc.strerror or exc}",
            index=source.index,
            source=source.label,
        ) from None
    if isinstance(data, str) or not isinstance(data, bytes | bytearray):
        raise ImageError(
            f"{name}: the file object must be opened in binary mode ('rb')",
            index=source.index,
            source=source.label,
        )
    return bytes(data)

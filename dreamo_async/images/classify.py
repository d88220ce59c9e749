"""What each input of ``images=[...]`` is, decided from its Python type alone (no I/O).

Runs when a request is built, and refuses what can never work (an ``int``, a
``file:`` URL, a malformed data URI, empty bytes, a text-mode file). A ``str`` is
never a local file: it is an http(s) URL or a ``data:`` URI; files are passed as
``os.PathLike`` (``pathlib.Path``), bytes or binary file objects. A web app that
forwards its callers' strings can then not be made to upload its own files.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO, Final, Literal
from urllib.parse import urlsplit

import attrs

from .._netguard import display_url
from ..errors import ImageError

__all__ = [
    "ImageInput",
    "ImageSource",
    "SourceKind",
    "classify_images",
    "image_error",
    "path_or_url",
]


#: What users may pass in ``images=[...]``: a ``str`` only as an http(s) URL or a data URI.
ImageInput = str | os.PathLike[str] | bytes | bytearray | memoryview | BinaryIO
SourceKind = Literal["path", "bytes", "file", "data_uri", "url"]

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


# --------------------------------------------------------------------------- classify


def classify_images(images: Sequence[object]) -> tuple[ImageSource, ...]:
    """Classify each input by its Python type, with no I/O; refuse what can never be an image.

    A ``str`` is a URL when it starts with ``http://`` or ``https://`` and a data
    URI when it starts with ``data:``; any other ``str`` is refused, never looked
    up as a file (the same message whether or not such a file exists): local
    files come as ``os.PathLike`` (``pathlib.Path``), bytes or binary file objects.
    """
    return tuple(_classify(index, item) for index, item in enumerate(images))


def path_or_url(text: str) -> str | Path:
    """A trusted text (a jobs file, the command line) as an image input: a URL, a data
    URI or any ``scheme:`` text stays a ``str`` (classified, or refused, as such); the
    rest is a local path. Never for text from a web caller: there a ``str`` is no file.
    """
    if not text:
        return text  # refused as an empty str, not taken for the current folder
    lowered = text[:16].lower()
    if lowered.startswith(("http://", "https://", "data:")) or _scheme_of(text):
        return text
    return Path(text)


def _scheme_of(text: str) -> str | None:
    """The scheme of ``text`` when it reads as a URL (``ftp://x``, ``javascript:x``)."""
    scheme, sep, rest = text.partition(":")
    if (
        sep
        and len(scheme) > 1
        and scheme.replace("+", "").replace("-", "").isalnum()
        and (rest.startswith("//") or scheme.lower() in _REFUSED_SCHEMES)
    ):
        return scheme.lower()
    return None


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
        path = os.fspath(item)  # the path as given: relative stays relative
        return ImageSource(index, "path", item, path if isinstance(path, str) else repr(path))
    if isinstance(item, io.TextIOBase):
        raise image_error(index, _file_label(item), "is a text-mode file; open it with 'rb'")
    if callable(getattr(item, "read", None)):
        return ImageSource(index, "file", item, _file_label(item))
    raise image_error(
        index,
        type(item).__name__,
        f"has the unsupported type {type(item).__name__}; pass a pathlib.Path, bytes, "
        "a binary file object, a data URI or an http(s) URL",
    )


#: Tuples, not unions, in isinstance: a union is rebuilt at every call.
_BYTES_LIKE: Final = (bytes, bytearray, memoryview)


def _classify_bytes(index: int, item: bytes | bytearray | memoryview) -> ImageSource:
    size = item.nbytes if isinstance(item, memoryview) else len(item)
    label = f"<bytes {size} B>"
    if size == 0:
        raise image_error(index, label, "is empty (0 bytes)")
    return ImageSource(index, "bytes", item, label)


def _classify_str(index: int, item: str) -> ImageSource:
    lowered = item[:16].lower()
    if lowered.startswith(("http://", "https://")):
        label = _url_label(item)
        _check_sendable(index, label, item)
        if not urlsplit(item).hostname:
            raise image_error(index, label, "is a URL without a host")
        return ImageSource(index, "url", item, label)
    if lowered.startswith("data:"):
        _check_sendable(index, "<data URI>", item)
        _check_data_uri(index, item)
        return ImageSource(index, "data_uri", item, "<data URI>")
    if scheme := _scheme_of(item):
        raise image_error(
            index,
            _url_label(item),
            f"is a {scheme}: URL; only http:// and https:// URLs are accepted "
            "(or a pathlib.Path, bytes, a file object, a data URI)",
        )
    if len(item) > 1024 and item.startswith(_BASE64_IMAGE_STARTS):
        raise image_error(
            index,
            "<base64 text>",
            "looks like base64 text; pass the decoded bytes or a data URI "
            "(data:image/jpeg;base64,...)",
        )
    # Never a file, whether or not one exists by that name: no file system access, so
    # neither the answer nor its timing tells a web caller what the server holds.
    raise image_error(
        index,
        repr(_short(item)),
        "is a str that is neither an http(s) URL nor a data: URI; a str is never read "
        "as a local file: pass pathlib.Path(...) for a file",
    )


def _check_sendable(index: int, label: str, text: str) -> None:
    """Refuse text that cannot be sent as UTF-8 (a lone surrogate): the create would crash.

    Paths are not checked: a file name may hold surrogate escapes and still open.
    """
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError as exc:
            raise image_error(
                index, label, f"holds a character that cannot be sent ({exc.reason} at {exc.start})"
            ) from None


def _file_label(item: object) -> str:
    name = getattr(item, "name", None)
    if isinstance(name, str) and name:
        return name  # as given
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
        raise image_error(
            index,
            "<data URI>",
            "must be a base64 data URI like data:image/jpeg;base64,/9j/...",
        )
    if not payload.strip():
        raise image_error(index, "<data URI>", "has no data after the comma")


def image_error(index: int, source: str, text: str) -> ImageError:
    """The refusal of input ``index`` (0-based, as ``err.index``); messages count from 1."""
    return ImageError(f"image {index + 1} ({source}) {text}", index=index, source=source)

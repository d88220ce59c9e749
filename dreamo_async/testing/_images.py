"""Small real images for tests and the demo, and the server's own image checks.

Pure stdlib on purpose: the fake must run where Pillow is not installed.
"""

from __future__ import annotations

import struct
import zlib
from importlib import resources
from pathlib import Path
from typing import Final

__all__ = ["image_info", "make_jpeg", "make_png", "sample_images"]

PNG_SIGNATURE: Final = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE: Final = b"\xff\xd8\xff"
# SOF markers carry the frame size; C4 (DHT), C8 (JPG) and CC (DAC) share the range.
_SOF_MARKERS: Final = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data))
        + kind
        + data
        + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def make_png(width: int, height: int, *, color: tuple[int, int, int] = (200, 120, 40)) -> bytes:
    """A valid, decodable RGB PNG of one color (compresses to almost nothing at any size)."""
    if width < 1 or height < 1:
        raise ValueError("width and height must be positive")
    row = b"\x00" + bytes(color) * width
    pixels = zlib.compress(row * height, 9)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return PNG_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", pixels) + _chunk(b"IEND", b"")


def make_jpeg(width: int, height: int, *, padding: int = 0) -> bytes:
    """The header of a baseline JPEG (SOI, APP0, optional COM padding, SOF0, SOS) and EOI.

    Enough for header readers (format, dimensions) and for the fake server's
    checks; it has no decodable pixels. ``padding`` adds that many bytes of COM
    segments, to reach a given file size (size-limit tests).
    """
    out = bytearray(b"\xff\xd8")
    out += b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    while padding > 0:
        size = min(padding, 65533)
        out += b"\xff\xfe" + struct.pack(">H", size + 2) + b"\x00" * size
        padding -= size
    out += b"\xff\xc0" + struct.pack(">HBHHB", 17, 8, height, width, 3)
    out += b"\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    # A start-of-scan segment and one byte of scan data: real files always have
    # one, and strict header readers treat a JPEG without it as truncated.
    out += b"\xff\xda" + struct.pack(">HB", 12, 3) + b"\x01\x00\x02\x11\x03\x11\x00\x3f\x00"
    out += b"\x00"
    out += b"\xff\xd9"
    return bytes(out)


def image_info(data: bytes) -> tuple[str, int, int] | None:
    """``(format, width, height)`` read from a JPEG or PNG header; ``None`` if unreadable.

    The fake refuses what the real service could not open, so it reads the header
    the way a decoder would start: by magic bytes, never by a file name.
    """
    if data.startswith(PNG_SIGNATURE):
        if len(data) < 24 or data[12:16] != b"IHDR":
            return None
        width, height = struct.unpack(">II", data[16:24])
        return ("png", width, height)
    if data.startswith(JPEG_SIGNATURE):
        return _jpeg_info(data)
    return None


def _jpeg_info(data: bytes) -> tuple[str, int, int] | None:
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # standalone markers: no length
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if length < 2:
            return None
        if marker in _SOF_MARKERS:
            if pos + 9 > len(data):
                return None
            height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
            return ("jpeg", width, height)
        if marker in (0xD9, 0xDA):  # EOI or scan data before any frame header
            return None
        pos += 2 + length
    return None


def sample_images() -> list[Path]:
    """The bundled sample JPEG and PNG files (aspect ratios from 16:9 to 9:16), sorted.

    Used by ``dreamo demo`` and handy in users' own tests: real files that pass
    every client-side check.
    """
    folder = resources.files("dreamo_async.testing") / "assets"
    return sorted(
        Path(str(entry)) for entry in folder.iterdir() if entry.name.endswith((".jpg", ".png"))
    )

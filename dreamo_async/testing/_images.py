"""Small real images for tests and the demo, with no dependency beyond the stdlib."""

from __future__ import annotations

import struct
import zlib
from importlib import resources
from pathlib import Path

__all__ = ["make_jpeg", "make_png", "sample_images"]


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data))
        + kind
        + data
        + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def make_png(width: int, height: int, *, color: tuple[int, int, int] = (200, 120, 40)) -> bytes:
    """A valid RGB PNG of one color (compresses to almost nothing at any size)."""
    row = b"\x00" + bytes(color) * width
    pixels = zlib.compress(row * height, 9)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", pixels)
        + _chunk(b"IEND", b"")
    )


def make_jpeg(width: int, height: int, *, padding: int = 0) -> bytes:
    """The header of a baseline JPEG (SOI, APP0, optional COM padding, SOF0) and EOI.

    Enough for header readers (dimensions, format); not decodable pixels. ``padding``
    adds that many bytes of COM segments, to reach a given file size.
    """
    out = bytearray(b"\xff\xd8")
    out += b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    while padding > 0:
        size = min(padding, 65533)
        out += b"\xff\xfe" + struct.pack(">H", size + 2) + b"\x00" * size
        padding -= size
    out += b"\xff\xc0" + struct.pack(">HBHHB", 17, 8, height, width, 3)
    out += b"\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    out += b"\xff\xd9"
    return bytes(out)


def sample_images() -> list[Path]:
    """The bundled sample JPEG and PNG files (used by ``dreamo demo``)."""
    folder = resources.files("dreamo_async.testing") / "assets"
    return sorted(
        Path(str(entry)) for entry in folder.iterdir() if entry.name.endswith((".jpg", ".png"))
    )

"""Format and dimensions of an image from its first bytes: no pixel decoding, bounded work.

Why our own parser and not Pillow's lazy ``Image.open``: the service takes only
JPEG and PNG, whose headers are small and well specified; a 150-line reader
needs no optional dependency, never allocates from a length field, and is
measured in ``benchmarks/bench_preprocess.py`` against Pillow.

Every malformed input raises :class:`HeaderError` (never ``IndexError`` or
``struct.error``); callers turn it into an ``ImageError`` naming the image.
"""

from __future__ import annotations

import struct
import zlib
from typing import Final

__all__ = ["HeaderError", "read_dimensions", "sniff_format"]

PNG_SIGNATURE: Final = b"\x89PNG\r\n\x1a\n"

#: JPEG start-of-frame markers the service decodes: baseline, extended, progressive
#: (Huffman). Lossless (C3) and arithmetic-coded (C9-CB, CD-CF) frames are refused:
#: common decoders (libjpeg builds used by Pillow, browsers) reject most of them.
_SOF_ACCEPTED: Final = frozenset({0xC0, 0xC1, 0xC2})
_SOF_REFUSED: Final = frozenset({0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
#: Markers with no length field.
_STANDALONE: Final = frozenset({0x01, *range(0xD0, 0xD8)})


class HeaderError(ValueError):
    """The header is truncated, corrupt, or of a kind the service does not take."""


def sniff_format(head: bytes) -> str | None:
    """Name the format of a file from its first bytes (``None`` if unknown).

    JPEG and PNG are the accepted ones; the others are named so an error can say
    what the file really is.
    """
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(PNG_SIGNATURE):
        return "PNG"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    if head.startswith(b"BM"):
        return "BMP"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "TIFF"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"avif", b"avis"):
            return "AVIF"
        if brand in (b"heic", b"heix", b"hevc", b"hevx", b"mif1", b"msf1", b"heim", b"heis"):
            return "HEIC"
        return "an ISO media file (MP4/MOV)"
    if head.startswith(b"%PDF"):
        return "PDF"
    if head.startswith(b"\x00\x00\x01\x00"):
        return "ICO"
    if head.startswith((b"\x00\x00\x00\x0cjP  ", b"\xff\x4f\xff\x51")):
        return "JPEG 2000"
    if head.startswith((b"\xff\x0a", b"\x00\x00\x00\x0cJXL ")):
        return "JPEG XL"
    if head.startswith(b"8BPS"):
        return "PSD"
    text = head[:256].lstrip().lower()
    if text.startswith(b"<svg") or (text.startswith(b"<?xml") and b"<svg" in text):
        return "SVG"
    if text.startswith((b"<!doctype html", b"<html")):
        return "HTML"
    return None


def read_dimensions(data: bytes | memoryview, kind: str) -> tuple[int, int]:
    """``(width, height)`` of a JPEG or PNG from its header."""
    view = memoryview(data)
    if kind == "PNG":
        return _png_dimensions(view)
    if kind == "JPEG":
        return _jpeg_dimensions(view)
    raise HeaderError(f"no header reader for {kind}")


def _png_dimensions(view: memoryview) -> tuple[int, int]:
    # Signature (8) + IHDR chunk: length (4) "IHDR" (4) data (13) CRC (4).
    if len(view) < 33:
        raise HeaderError(f"PNG header is truncated ({len(view)} bytes)")
    length, kind = struct.unpack(">I4s", view[8:16])
    if kind != b"IHDR" or length != 13:
        raise HeaderError("PNG does not start with a valid IHDR chunk")
    ihdr = bytes(view[16:29])
    (crc,) = struct.unpack(">I", view[29:33])
    if zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF != crc:
        raise HeaderError("PNG IHDR checksum does not match (corrupt file)")
    width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", ihdr)
    if width == 0 or height == 0:
        raise HeaderError(f"PNG declares a size of {width} x {height}")
    if color not in (0, 2, 3, 4, 6) or depth not in (1, 2, 4, 8, 16) or interlace > 1:
        raise HeaderError(f"PNG declares an invalid color type {color} / bit depth {depth}")
    return width, height


def _jpeg_dimensions(view: memoryview) -> tuple[int, int]:
    size = len(view)
    if size < 4 or view[0] != 0xFF or view[1] != 0xD8:
        raise HeaderError("JPEG does not start with SOI")
    pos = 2
    while True:
        # Find the next marker: 0xFF, possibly repeated (fill bytes), then the code.
        if pos >= size:
            raise HeaderError("JPEG ends before its frame header (SOF)")
        if view[pos] != 0xFF:
            raise HeaderError(f"JPEG marker expected at byte {pos}, found 0x{view[pos]:02X}")
        while pos < size and view[pos] == 0xFF:
            pos += 1
        if pos >= size:
            raise HeaderError("JPEG ends inside a marker")
        marker = view[pos]
        pos += 1
        if marker in _STANDALONE:
            continue
        if marker in (0xD8, 0xD9, 0xDA, 0x00):
            raise HeaderError(f"JPEG reaches marker 0x{marker:02X} before its frame header")
        if pos + 2 > size:
            raise HeaderError("JPEG ends inside a segment length")
        (length,) = struct.unpack(">H", view[pos : pos + 2])
        if length < 2:
            raise HeaderError(f"JPEG segment 0x{marker:02X} has an invalid length {length}")
        if marker in _SOF_ACCEPTED or marker in _SOF_REFUSED:
            if pos + 7 > size or length < 8:
                raise HeaderError("JPEG frame header is truncated")
            if marker in _SOF_REFUSED:
                raise HeaderError(
                    f"JPEG uses an unsupported coding (SOF 0x{marker:02X}: lossless or "
                    "arithmetic); save it as a baseline or progressive JPEG"
                )
            height, width = struct.unpack(">HH", view[pos + 3 : pos + 7])
            if width == 0 or height == 0:
                raise HeaderError(f"JPEG declares a size of {width} x {height}")
            return width, height
        pos += length

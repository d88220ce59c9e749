"""A corpus of odd real-world image files, built in memory with Pillow and byte surgery.

Used by the header tests (every case must get the expected verdict) and by
``benchmarks/bench_preprocess.py`` (own parser against Pillow's lazy open, for
speed and agreement). Each :class:`Case` says what a careful client should
conclude: accept with a given format and size, or refuse with a message that
contains ``refuse``.

Files are small (tens of KB) so that building the whole corpus takes well
under a second; the oddity is in the structure, not the size.
"""

from __future__ import annotations

import functools
import io
import random
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

from PIL import Image, ImageCms

__all__ = [
    "Case",
    "build_corpus",
    "header_end",
    "jpeg_bytes",
    "noise_image",
    "pillow_header",
    "png_bytes",
    "raw_png",
    "segment",
    "with_sof_field",
]


@dataclass(frozen=True)
class Case:
    """One file and the verdict expected for it."""

    name: str
    data: bytes
    #: ``(format, width, height)`` as stored, when the file must be accepted.
    expect: tuple[str, int, int] | None = None
    #: A fragment of the refusal message, when it must be refused.
    refuse: str | None = None
    #: The EXIF orientation the header reader must report.
    orientation: int = 1

    @property
    def accepted(self) -> bool:
        return self.expect is not None


# --------------------------------------------------------------------------- builders


def noise_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A deterministic image: a gradient with noise, so encoders produce real data."""
    rng = random.Random(seed)
    base = Image.linear_gradient("L").resize((width, height))
    noise = Image.frombytes("L", (width, height), rng.randbytes(width * height))
    mixed = Image.blend(base, noise, 0.3)
    if mode == "L":
        return mixed
    rgb = Image.merge("RGB", (mixed, mixed.transpose(Image.Transpose.FLIP_LEFT_RIGHT), base))
    return rgb.convert(mode)


def jpeg_bytes(image: Image.Image, **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", **options)
    return out.getvalue()


def png_bytes(image: Image.Image, **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG", **options)
    return out.getvalue()


def segment(marker: int, payload: bytes) -> bytes:
    """A JPEG marker segment (``payload`` at most 65533 bytes)."""
    return bytes((0xFF, marker)) + struct.pack(">H", len(payload) + 2) + payload


def _insert_after_soi(jpeg: bytes, extra: bytes) -> bytes:
    assert jpeg[:2] == b"\xff\xd8"
    return jpeg[:2] + extra + jpeg[2:]


def _sof_offset(jpeg: bytes) -> int:
    """Offset of the first SOFn marker of a Pillow-written JPEG (no thumbnails inside)."""
    for code in (0xC0, 0xC1, 0xC2):
        at = jpeg.find(bytes((0xFF, code)))
        if at > 0:
            return at
    raise AssertionError("no SOF")


def _with_sof(jpeg: bytes, code: int) -> bytes:
    at = _sof_offset(jpeg)
    return jpeg[: at + 1] + bytes((code,)) + jpeg[at + 2 :]


def with_sof_field(jpeg: bytes, offset: int, value: bytes) -> bytes:
    """Overwrite SOF bytes: offset 4 precision, 5 height, 7 width, 9 components."""
    at = _sof_offset(jpeg) + offset
    return jpeg[:at] + value + jpeg[at + len(value) :]


def header_end(data: bytes) -> int:
    """Where the part a reader must see ends: JPEG after its first SOS, PNG after its first IDAT.

    Every prefix shorter than this must be refused.
    """
    if data.startswith(b"\x89PNG"):
        pos = 8
        while True:
            length, kind = struct.unpack(">I4s", data[pos : pos + 8])
            pos += 12 + int(length)
            if kind == b"IDAT":
                return pos
    at = data.find(b"\xff\xda")
    return at + 2 + int.from_bytes(data[at + 2 : at + 4], "big")


def _chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload)
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


_ADAM7 = (
    (0, 0, 8, 8),
    (4, 0, 8, 8),
    (0, 4, 4, 8),
    (2, 0, 4, 4),
    (0, 2, 2, 4),
    (1, 0, 2, 2),
    (0, 1, 1, 2),
)
_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


def raw_png(
    width: int,
    height: int,
    *,
    depth: int = 8,
    color: int = 2,
    interlace: int = 0,
    seed: int = 0,
    ihdr: bytes | None = None,
    before_ihdr: bytes = b"",
    end: bool = True,
) -> bytes:
    """A decodable PNG written by hand: 16-bit, Adam7-interlaced, palette... (Pillow can't).

    Interlaced images need whole-byte pixels (depth 8 or 16).
    """
    rng = random.Random(seed)
    bits = depth * _CHANNELS[color]
    if color == 3:
        rows = [bytes(rng.randrange(1 << depth) for _ in range(width)) for _ in range(height)]
        rows = [_pack_bits(row, depth) for row in rows]
    else:
        rows = [rng.randbytes((width * bits + 7) // 8) for _ in range(height)]
    if interlace:
        step = bits // 8
        raw = b"".join(
            b"\x00" + b"".join(rows[y][x * step : (x + 1) * step] for x in range(x0, width, dx))
            for x0, y0, dx, dy in _ADAM7
            if x0 < width
            for y in range(y0, height, dy)
        )
    else:
        raw = b"".join(b"\x00" + row for row in rows)
    header = ihdr or struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, interlace)
    body = _chunk(b"IHDR", header)
    if color == 3:
        body += _chunk(b"PLTE", rng.randbytes(3 * (1 << depth)))
    body += _chunk(b"IDAT", zlib.compress(raw))
    if end:
        body += _chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + before_ihdr + body


def _pack_bits(values: bytes, depth: int) -> bytes:
    if depth == 8:
        return values
    per = 8 // depth
    out = bytearray()
    for start in range(0, len(values), per):
        byte = 0
        for i, value in enumerate(values[start : start + per]):
            byte |= value << (8 - depth * (i + 1))
        out.append(byte)
    return bytes(out)


def _exif(orientation: int, order: str) -> bytes:
    """An APP1 EXIF payload with only the orientation tag, little- or big-endian."""
    e = "<" if order == "II" else ">"
    magic = b"II*\x00" if order == "II" else b"MM\x00*"
    ifd = struct.pack(e + "H", 1) + struct.pack(e + "HHIHH", 0x0112, 3, 1, orientation, 0)
    return b"Exif\x00\x00" + magic + struct.pack(e + "I", 8) + ifd + struct.pack(e + "I", 0)


def _exif_with_thumbnail(thumbnail: bytes) -> bytes:
    """EXIF whose IFD1 points at an embedded JPEG thumbnail (it has its own SOI and SOF)."""
    ifd0 = struct.pack("<H", 0) + struct.pack("<I", 14)  # no tags; IFD1 follows
    ifd1_at = 14
    thumb_at = ifd1_at + 2 + 2 * 12 + 4
    ifd1 = (
        struct.pack("<H", 2)
        + struct.pack("<HHII", 0x0201, 4, 1, thumb_at)
        + struct.pack("<HHII", 0x0202, 4, 1, len(thumbnail))
        + struct.pack("<I", 0)
    )
    return b"Exif\x00\x00" + b"II*\x00" + struct.pack("<I", 8) + ifd0 + ifd1 + thumbnail


def _xmp_chunks(total: int) -> bytes:
    """``total`` bytes of APP1 extended-XMP segments (64 KB each), as Photoshop writes."""
    prefix = b"http://ns.adobe.com/xmp/extension/\x00" + b"0" * 32 + b"\x00" * 8
    out = bytearray()
    while total > 0:
        size = min(total, 65533 - len(prefix))
        out += segment(0xE1, prefix + b"x" * size)
        total -= size
    return bytes(out)


def _icc() -> bytes:
    return bytes(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())


def _other(fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    image = noise_image(48, 32, "RGBA" if fmt in ("ICO",) else "RGB")
    image.save(out, fmt, **options)
    return out.getvalue()


# --------------------------------------------------------------------------- the corpus


@functools.cache
def build_corpus() -> tuple[Case, ...]:
    """Every case, built once per process."""
    return (*_jpeg_cases(), *_png_cases(), *_other_cases())


def _jpeg_cases() -> Iterator[Case]:
    rgb = noise_image(320, 240)
    base = jpeg_bytes(rgb, quality=85)
    yield Case("jpeg-baseline-jfif", base, ("jpeg", 320, 240))
    yield Case("jpeg-progressive", jpeg_bytes(rgb, progressive=True), ("jpeg", 320, 240))
    yield Case("jpeg-cmyk-adobe", jpeg_bytes(rgb.convert("CMYK")), ("jpeg", 320, 240))
    yield Case("jpeg-grayscale", jpeg_bytes(noise_image(200, 300, "L")), ("jpeg", 200, 300))
    yield Case("jpeg-444", jpeg_bytes(rgb, subsampling=0, quality=95), ("jpeg", 320, 240))
    yield Case("jpeg-restart-markers", jpeg_bytes(rgb, restart_marker_blocks=2), ("jpeg", 320, 240))
    yield Case("jpeg-icc-profile", jpeg_bytes(rgb, icc_profile=_icc()), ("jpeg", 320, 240))
    exif = Image.Exif()
    exif[0x0112] = 6
    yield Case(
        "jpeg-exif-rotated-6",
        jpeg_bytes(noise_image(400, 240), exif=exif.tobytes()),
        ("jpeg", 400, 240),
        orientation=6,
    )
    yield Case(
        "jpeg-exif-rotated-8-little-endian",
        _insert_after_soi(base, segment(0xE1, _exif(8, "II"))),
        ("jpeg", 320, 240),
        orientation=8,
    )
    yield Case(
        "jpeg-exif-orientation-3",
        _insert_after_soi(base, segment(0xE1, _exif(3, "MM"))),
        ("jpeg", 320, 240),
        orientation=3,
    )
    thumb = jpeg_bytes(noise_image(160, 120, seed=3))
    yield Case(
        "jpeg-exif-thumbnail-before-sof",
        _insert_after_soi(base, segment(0xE1, _exif_with_thumbnail(thumb))),
        ("jpeg", 320, 240),
    )
    yield Case(
        "jpeg-1mb-metadata-before-sof",
        _insert_after_soi(base, _xmp_chunks(1_000_000)),
        ("jpeg", 320, 240),
    )
    yield Case(
        "jpeg-comment-and-app-segments",
        _insert_after_soi(
            base, segment(0xFE, b"made by hand") + segment(0xEC, b"Ducky" + bytes(10))
        ),
        ("jpeg", 320, 240),
    )
    fill = base.replace(b"\xff\xdb", b"\xff\xff\xff\xff\xdb").replace(b"\xff\xc0", b"\xff\xff\xc0")
    yield Case("jpeg-fill-bytes", fill, ("jpeg", 320, 240))
    yield Case(
        "jpeg-standalone-markers-before-sof",
        _insert_after_soi(base, b"\xff\x01\xff\xd0"),
        ("jpeg", 320, 240),
    )
    yield Case("jpeg-trailing-data", base + b"\x00" * 300 + b"MotionPhoto" * 50, ("jpeg", 320, 240))
    mpo = io.BytesIO()
    rgb.save(mpo, "MPO", save_all=True, append_images=[noise_image(320, 240, seed=1)])
    yield Case("jpeg-mpo-stereo", mpo.getvalue(), ("jpeg", 320, 240))
    yield Case("jpeg-1x1", jpeg_bytes(noise_image(1, 1)), ("jpeg", 1, 1))
    yield Case("jpeg-wide-16x9", jpeg_bytes(noise_image(1600, 900)), ("jpeg", 1600, 900))
    yield from _bad_jpeg_cases(base)


def _bad_jpeg_cases(base: bytes) -> Iterator[Case]:
    yield Case("jpeg-12-bit", with_sof_field(base, 4, b"\x0c"), refuse="12-bit JPEG")
    yield Case("jpeg-arithmetic", _with_sof(base, 0xC9), refuse="arithmetic-coded JPEG")
    yield Case("jpeg-lossless", _with_sof(base, 0xC3), refuse="lossless JPEG")
    yield Case("jpeg-hierarchical", _with_sof(base, 0xC5), refuse="hierarchical JPEG")
    yield Case("jpeg-ls", _with_sof(base, 0xF7), refuse="JPEG-LS")
    yield Case("jpeg-height-0-dnl", with_sof_field(base, 5, b"\x00\x00"), refuse="0")
    yield Case("jpeg-2-components", with_sof_field(base, 9, b"\x02"), refuse="components")
    yield Case("jpeg-no-eoi", base[:-2], refuse="truncated")
    yield Case("jpeg-cut-in-scan", base[: len(base) // 2], refuse="truncated")
    yield Case("jpeg-soi-only", b"\xff\xd8\xff", refuse="JPEG")
    yield Case(
        "jpeg-lying-length",
        base[:2] + b"\xff\xe1\xff\xff" + b"Exif\x00\x00" + b"\x00" * 100,
        refuse="truncated",
    )
    yield Case(
        "jpeg-garbage-after-soi",
        b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"\x12" * 200,
        refuse="corrupt",
    )
    yield Case(
        "jpeg-sos-before-sof",
        base[:2] + segment(0xDA, b"\x00" * 10) + base[2:],
        refuse="before its frame header",
    )


def _png_cases() -> Iterator[Case]:
    rgb = noise_image(300, 200)
    yield Case("png-rgb", png_bytes(rgb), ("png", 300, 200))
    yield Case("png-rgba", png_bytes(rgb.convert("RGBA")), ("png", 300, 200))
    yield Case("png-palette", png_bytes(rgb.convert("P")), ("png", 300, 200))
    yield Case("png-gray-1bit", raw_png(37, 20, depth=1, color=0), ("png", 37, 20))
    yield Case("png-palette-4bit", raw_png(33, 21, depth=4, color=3), ("png", 33, 21))
    yield Case("png-16bit-rgb", raw_png(64, 48, depth=16, color=2), ("png", 64, 48))
    yield Case("png-16bit-gray-alpha", raw_png(40, 30, depth=16, color=4), ("png", 40, 30))
    yield Case("png-interlaced", raw_png(61, 43, interlace=1), ("png", 61, 43))
    yield Case(
        "png-interlaced-16bit-rgba",
        raw_png(29, 35, depth=16, color=6, interlace=1),
        ("png", 29, 35),
    )
    apng = io.BytesIO()
    rgb.save(
        apng, "PNG", save_all=True, append_images=[noise_image(300, 200, seed=5)], duration=100
    )
    yield Case("png-apng", apng.getvalue(), ("png", 300, 200))
    yield Case("png-icc", png_bytes(rgb, icc_profile=_icc()), ("png", 300, 200))
    yield Case("png-no-iend", raw_png(20, 20, end=False), ("png", 20, 20))
    yield Case("png-trailing-data", png_bytes(rgb) + b"\x00" * 64, ("png", 300, 200))
    good = raw_png(20, 10)
    yield Case("png-bad-ihdr-crc", good[:29] + b"\x00\x00\x00\x00" + good[33:], refuse="checksum")
    bad_depth = struct.pack(">IIBBBBB", 20, 10, 16, 3, 0, 0, 0)
    yield Case("png-invalid-depth", raw_png(20, 10, ihdr=bad_depth), refuse="invalid combination")
    zero = struct.pack(">IIBBBBB", 0, 10, 8, 2, 0, 0, 0)
    yield Case("png-zero-width", raw_png(20, 10, ihdr=zero), refuse="invalid size")
    yield Case(
        "png-cgbi-apple",
        raw_png(20, 10, before_ihdr=_chunk(b"CgBI", b"\x50\x00\x20\x06")),
        refuse="CgBI",
    )
    yield Case("png-text-mode-damaged", good.replace(b"\r\n", b"\n", 1), refuse="damaged")
    yield Case("png-signature-only", good[:8], refuse="truncated")
    yield Case(
        "png-ihdr-not-first", good[:8] + _chunk(b"tEXt", b"a\x00b") + good[8:], refuse="IHDR"
    )


def _other_cases() -> Iterator[Case]:
    yield Case("empty", b"", refuse="empty")
    yield Case("gif", _other("GIF"), refuse="is GIF")
    yield Case("webp", _other("WEBP"), refuse="is WebP")
    yield Case("avif", _other("AVIF"), refuse="is AVIF")
    yield Case("bmp", _other("BMP"), refuse="is BMP")
    yield Case("tiff", _other("TIFF"), refuse="is TIFF")
    yield Case("ico", _other("ICO"), refuse="is ICO")
    yield Case("pdf", _other("PDF"), refuse="is PDF")
    yield Case("ppm", _other("PPM"), refuse="is PNM")
    yield Case("qoi", _other("QOI"), refuse="is QOI")
    yield Case("jpeg2000", _other("JPEG2000"), refuse="is JPEG 2000")
    yield Case("jpeg2000-jp2", _other("JPEG2000", no_jp2=False), refuse="is JPEG 2000")
    yield Case("tga-no-magic", _other("TGA"), refuse="not a recognisable image")
    yield Case(
        "heic", b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64), refuse="is HEIC"
    )
    yield Case("jpeg-xl", b"\xff\x0a\xfa\x7f" + bytes(60), refuse="is JPEG XL")
    yield Case("psd", b"8BPS\x00\x01" + bytes(60), refuse="is PSD")
    yield Case(
        "svg", b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>', refuse="is SVG"
    )
    yield Case(
        "html-error-page",
        b"<!DOCTYPE html><html><body>403 Forbidden</body></html>",
        refuse="is an HTML page",
    )
    yield Case(
        "random-bytes",
        random.Random(7).randbytes(256).replace(b"\xff", b"\x00"),
        refuse="not a recognisable image",
    )


# --------------------------------------------------------------------------- Pillow


def pillow_header(data: bytes) -> tuple[str, int, int]:
    """Pillow's lazy answer to the same question: format and size, no pixel decoding.

    Raises whatever Pillow raises for an unreadable file, and ``ValueError`` for
    a format other than JPEG (MPO counts) or PNG.
    """
    with Image.open(io.BytesIO(data), formats=None) as image:
        fmt = {"JPEG": "jpeg", "MPO": "jpeg", "PNG": "png"}.get(image.format or "")
        if fmt is None:
            raise ValueError(f"is {image.format}")
        width, height = image.size
        return fmt, width, height

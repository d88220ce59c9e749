"""The header reader and the format sniffer, on the odd-files corpus and on hostile bytes."""

from __future__ import annotations

import contextlib
import struct
import time
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dreamo_async.errors import ImageError
from dreamo_async.images import inspect_image
from dreamo_async.images.headers import (
    MAX_JPEG_SEGMENTS,
    MAX_PNG_CHUNKS,
    HeaderError,
    read_header,
    sniff_format,
)
from dreamo_async.limits import Limits

from .image_corpus import Case, build_corpus, header_end, jpeg_bytes, noise_image, raw_png, segment

CORPUS = build_corpus()
ACCEPTED = [case for case in CORPUS if case.accepted]
REFUSED = [case for case in CORPUS if not case.accepted]
NO_ASPECT = Limits(aspect_policy="off")


def _ids(cases: list[Case]) -> list[str]:
    return [case.name for case in cases]


# --------------------------------------------------------------------------- the corpus


@pytest.mark.parametrize("case", ACCEPTED, ids=_ids(ACCEPTED))
def test_accepted_files_report_format_size_and_orientation(case: Case) -> None:
    info, notes = inspect_image(case.data, index=0, source=case.name, limits=NO_ASPECT)
    assert (info.format, info.width, info.height) == case.expect
    assert info.orientation == case.orientation
    assert info.size == len(case.data)
    assert notes == []


@pytest.mark.parametrize("case", REFUSED, ids=_ids(REFUSED))
def test_refused_files_name_the_image_and_the_reason(case: Case) -> None:
    with pytest.raises(ImageError) as caught:
        inspect_image(case.data, index=3, source=case.name, limits=NO_ASPECT)
    message = str(caught.value)
    assert message.startswith(f"image 4 ({case.name}) ")
    assert case.refuse is not None
    assert case.refuse in message
    assert caught.value.index == 3
    assert caught.value.source == case.name
    assert caught.value.parameter == "images[3]"


def test_a_webp_named_png_is_refused_as_webp() -> None:
    webp = next(case for case in CORPUS if case.name == "webp")
    with pytest.raises(
        ImageError, match=r"^image 3 \(cat\.png\) is WebP; the service accepts JPEG or PNG$"
    ):
        inspect_image(webp.data, index=2, source="cat.png")


# --------------------------------------------------------------------------- truncation


def _offsets(end: int) -> range | list[int]:
    """Every offset for normal files; for the 1 MB-metadata file every byte of its edges."""
    if end <= 8192:
        return range(end)
    return [*range(4096), *range(4096, end - 4096, 997), *range(end - 4096, end)]


@pytest.mark.parametrize("case", ACCEPTED, ids=_ids(ACCEPTED))
def test_truncated_at_every_header_offset_is_an_image_error(case: Case) -> None:
    for offset in _offsets(header_end(case.data)):
        with pytest.raises(ImageError):
            inspect_image(case.data[:offset], index=0, source="cut", limits=NO_ASPECT)


def _cases_named(*prefixes: str) -> list[Case]:
    return [
        case
        for case in ACCEPTED
        if case.name.startswith(prefixes) and "trailing" not in case.name and "mpo" not in case.name
    ]


@pytest.mark.parametrize("case", _cases_named("jpeg-"), ids=_ids(_cases_named("jpeg-")))
def test_a_jpeg_cut_anywhere_before_its_end_is_refused(case: Case) -> None:
    """The whole file, not only the header: a partial download never reaches the service."""
    data = case.data
    for offset in range(header_end(data), len(data), max(1, len(data) // 500)):
        with pytest.raises(ImageError, match="truncated"):
            inspect_image(data[:offset], index=0, source="cut", limits=NO_ASPECT)


def test_a_png_cut_inside_its_image_data_is_refused() -> None:
    data = raw_png(60, 40)  # one IDAT chunk, then IEND (12 bytes)
    idat_end = len(data) - 12
    for offset in range(len(data)):
        if offset < idat_end:
            with pytest.raises(ImageError):
                inspect_image(data[:offset], index=0, source="cut", limits=NO_ASPECT)
        else:  # IEND missing or cut: decoders (Pillow too) still read the image
            assert inspect_image(data[:offset], index=0, source="cut", limits=NO_ASPECT)


def test_trailing_data_and_mpo_frames_may_be_cut() -> None:
    """Data after the first image's EOI is not the image: cutting it changes nothing."""
    mpo = next(case for case in CORPUS if case.name == "jpeg-mpo-stereo").data
    first_eoi = mpo.index(b"\xff\xd9", header_end(mpo)) + 2
    info, _ = inspect_image(mpo[: first_eoi + 100], index=0, source="mpo")
    assert (info.width, info.height) == (320, 240)


# --------------------------------------------------------------------------- hostile bytes


def test_lying_lengths_allocate_nothing_and_finish_at_once() -> None:
    base = jpeg_bytes(noise_image(64, 48))
    hostile = [
        b"\xff\xd8" + b"\xff\xe1\xff\xff",  # a 64 KB segment in a 6-byte file
        b"\xff\xd8" + b"\xff\xc0\xff\xff" + b"\x08\xff\xff\xff\xff\x03",  # 65535 x 65535
        b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 2**31) + b"IHDR" + bytes(20),
        raw_png(8, 8)[:33] + struct.pack(">I", 2**31 - 1) + b"IDAT" + bytes(16),
        base[:2] + b"\xff" * 1_000_000,  # fill bytes forever
    ]
    tracemalloc.start()
    try:
        started = time.perf_counter()
        for data in hostile:
            with pytest.raises(HeaderError):
                read_header(data)
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 200_000  # no buffer sized from a length field (the inputs are not traced)
    assert elapsed < 0.5


def test_the_segment_walk_is_bounded() -> None:
    comments = segment(0xFE, b"") * (MAX_JPEG_SEGMENTS + 1)
    data = b"\xff\xd8" + comments + jpeg_bytes(noise_image(8, 8))[2:]
    with pytest.raises(HeaderError, match=f"more than {MAX_JPEG_SEGMENTS} segments"):
        read_header(data)


def test_the_chunk_walk_is_bounded() -> None:
    empty_idat = struct.pack(">I", 0) + b"IDAT" + b"\x00" * 4
    data = raw_png(4, 4)[:33] + empty_idat * (MAX_PNG_CHUNKS + 1)
    with pytest.raises(HeaderError, match="more than"):
        read_header(data)


def test_a_2_gb_chunk_length_is_corrupt_not_a_read() -> None:
    data = raw_png(4, 4)[:33] + struct.pack(">I", 0xFFFFFFFF) + b"IDAT"
    with pytest.raises(HeaderError, match="invalid length"):
        read_header(data)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    case=st.sampled_from(ACCEPTED),
    edits=st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)), max_size=8),
    cut=st.integers(0, 4096),
)
def test_mutated_headers_raise_only_header_error(
    case: Case, edits: list[tuple[int, int]], cut: int
) -> None:
    data = bytearray(case.data[: header_end(case.data) + cut])
    for offset, value in edits:
        if offset < len(data):
            data[offset] = value
    try:
        header = read_header(bytes(data))
    except HeaderError:
        return
    assert header.width > 0
    assert header.height > 0


@settings(max_examples=300)
@given(
    prefix=st.sampled_from([b"\xff\xd8", b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b""]),
    rest=st.binary(max_size=300),
)
def test_random_bytes_raise_only_header_error(prefix: bytes, rest: bytes) -> None:
    with contextlib.suppress(HeaderError):
        read_header(prefix + rest)


def test_memoryviews_and_bytearrays_are_read_without_copies() -> None:
    data = jpeg_bytes(noise_image(64, 48))
    padded = b"xx" + data + b"yy"
    assert read_header(memoryview(padded)[2:-2]).width == 64
    assert read_header(bytearray(data)).height == 48


# --------------------------------------------------------------------------- sniffing


@pytest.mark.parametrize(
    ("head", "name"),
    [
        (b"\xff\xd8\xff\xe0", "JPEG"),
        (b"\x89PNG\r\n\x1a\n", "PNG"),
        (b"GIF89a", "GIF"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "WebP"),
        (b"BM" + bytes(12) + struct.pack("<I", 40), "BMP"),
        (b"BMW is a car", "text"),
        (b"II*\x00", "TIFF"),
        (b"MM\x00*", "TIFF"),
        (b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1miaf", "AVIF"),
        (b"\x00\x00\x00\x18ftypmif1\x00\x00\x00\x00mif1heic", "HEIC/HEIF"),
        (b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2", "a video (MP4/MOV)"),
        (b"%PDF-1.7", "PDF"),
        (b"\x00\x00\x01\x00\x01\x00", "ICO"),
        (b"\x00\x00\x02\x00\x00\x00\x00\x00", None),  # a TGA header, no magic
        (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"),
        (b"\xff\x0a", "JPEG XL"),
        (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "JPEG XL"),
        (b"8BPS", "PSD"),
        (b"\xef\xbb\xbf  <svg xmlns='http://www.w3.org/2000/svg'>", "SVG"),
        (b"<?xml version='1.0'?><!-- x --><svg>", "SVG"),
        (b"<?xml version='1.0'?><feed/>", "XML"),
        (b"\n<!DOCTYPE html><title>404</title>", "an HTML page"),
        (b'{"error": "not found"}', "JSON text"),
        (b"P6\n640 480\n255\n", "PNM"),
        (b"PK\x03\x04", "a ZIP archive"),
        (b"", None),
        (b"\x00\x01\x02\x03", None),
    ],
)
def test_sniff_format_names_what_it_recognises(head: bytes, name: str | None) -> None:
    assert sniff_format(head) == name


def test_sniff_handles_a_utf8_character_cut_at_the_end() -> None:
    assert sniff_format("<html>é".encode()[:-1]) == "an HTML page"

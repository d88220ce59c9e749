"""The image stage: classifying inputs, checking them by their bytes, preparing them off-loop."""

from __future__ import annotations

import array
import asyncio
import base64
import gc
import io
import os
import sys
import threading
import warnings
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dreamo_async.errors import DreamOWarning, ImageError, InvalidRequestError
from dreamo_async.images import (
    ImageInfo,
    ImageSource,
    PreparedImages,
    classify_images,
    inspect_image,
    live_payload_count,
    prepare_images,
)
from dreamo_async.limits import DEFAULT_LIMITS, CheckPolicy, Limits

from .image_corpus import jpeg_bytes, noise_image, png_bytes, raw_png, with_sof_field

JPEG = jpeg_bytes(noise_image(64, 48))
PNG = png_bytes(noise_image(40, 40))
TALL_JPEG = jpeg_bytes(noise_image(100, 400))  # 1:4, outside 9:16


def _data_uri(data: bytes, mime: str = "image/jpeg") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def _one(item: object) -> ImageSource:
    (source,) = classify_images([item])
    return source


async def _prepare(*items: object, **options: object) -> PreparedImages:
    return await prepare_images(classify_images(items), **options)  # type: ignore[arg-type]


def _decoded(prepared: PreparedImages) -> list[bytes]:
    return [base64.b64decode(item, validate=True) for item in prepared.base64]


@pytest.fixture
def jpeg_file(tmp_path: Path) -> Path:
    path = tmp_path / "cat.jpg"
    path.write_bytes(JPEG)
    return path


# --------------------------------------------------------------------------- classify


def test_every_source_kind_is_classified_without_io(tmp_path: Path) -> None:
    missing = tmp_path / "not-yet.png"  # does not exist: classification reads nothing
    handle = io.BytesIO(JPEG)
    sources = classify_images(
        [
            missing,
            JPEG,
            bytearray(PNG),
            memoryview(JPEG),
            handle,
            _data_uri(PNG, "image/png"),
            "https://cdn.example.com/a/b.jpg?X-Signature=secret#frag",
            "HTTP://Example.com/x.png",
        ]
    )
    assert [s.kind for s in sources] == [
        "path", "bytes", "bytes", "bytes", "file", "data_uri", "url", "url",
    ]  # fmt: skip
    assert [s.index for s in sources] == list(range(8))
    assert [s.label for s in sources] == [
        str(missing),  # the path as given
        f"<bytes {len(JPEG)} B>",
        f"<bytes {len(PNG)} B>",
        f"<bytes {len(JPEG)} B>",
        "<BytesIO>",
        "<data URI>",
        "cdn.example.com/a/b.jpg",
        "example.com/x.png",
    ]
    assert [s.is_url for s in sources] == [False] * 6 + [True] * 2
    assert handle.tell() == 0
    assert sources[0].value is not None
    assert "value" not in repr(sources[0])


def test_url_labels_never_show_credentials_or_queries() -> None:
    source = _one("https://user:pa55@host.example:8443/img.png?token=abc")
    assert source.label == "host.example:8443/img.png"
    assert "pa55" not in repr(source)
    assert "abc" not in repr(source)


def test_file_objects_are_labelled_by_their_file_name(jpeg_file: Path) -> None:
    with jpeg_file.open("rb") as handle:
        assert _one(handle).label == str(jpeg_file)


def test_classified_sources_pass_through_with_their_new_index() -> None:
    first = _one(JPEG)
    again = classify_images([PNG, first])
    assert again[1].index == 1
    assert again[1].value is JPEG


@pytest.mark.parametrize(
    ("item", "message"),
    [
        (42, r"\(int\) has the unsupported type int; pass a pathlib.Path, bytes, a binary"),
        (None, r"\(NoneType\) has the unsupported type NoneType"),
        (b"", r"\(<bytes 0 B>\) is empty \(0 bytes\)$"),
        (bytearray(), r"is empty"),
        ("", r"\(''\) is a str that is neither an http\(s\) URL nor a data: URI"),
        ("file:///etc/passwd", r"\(/etc/passwd\) is a file: URL; only http:// and https://"),
        ("ftp://example.com/a.png", r"\(example\.com/a\.png\) is a ftp: URL"),
        ("javascript:alert(1)", r"is a javascript: URL"),
        ("s3://bucket/key.png", r"is a s3: URL"),
        ("https:///no-host.png", r"is a URL without a host"),
        ("data:image/png,rawtext", r"\(<data URI>\) must be a base64 data URI"),
        ("data:image/png;base64,", r"has no data after the comma"),
        ("data:image/png;base64", r"must be a base64 data URI"),
        ("/9j/" + "A" * 2000, r"looks like base64 text; pass the decoded bytes"),
        (io.StringIO("text"), r"\(<StringIO>\) is a text-mode file; open it with 'rb'"),
    ],
)
def test_what_can_never_work_is_refused_at_construction(item: object, message: str) -> None:
    with pytest.raises(ImageError, match=r"^image 2 .*" + message) as caught:
        classify_images([JPEG, item])
    assert caught.value.index == 1
    assert caught.value.parameter == "images[1]"


def test_refusals_name_the_right_index() -> None:
    with pytest.raises(ImageError, match=r"^image 3 ") as caught:
        classify_images([JPEG, PNG, "ftp://x/y.png"])
    assert caught.value.index == 2
    assert caught.value.parameter == "images[2]"
    assert isinstance(caught.value, InvalidRequestError)
    assert isinstance(caught.value, ValueError)


def test_windows_drive_letters_and_colons_in_file_names_are_paths() -> None:
    assert _one(Path("C:\\photos\\cat.jpg")).kind == "path"
    assert _one(Path("photo:1.jpg")).kind == "path"


@pytest.mark.parametrize("exists", [True, False])
def test_a_str_is_never_a_local_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exists: bool
) -> None:
    """Issue 16: a web app forwarding a caller's str must not upload (or reveal) its files."""
    monkeypatch.chdir(tmp_path)  # a short name, whatever the length of tmp_path
    path = Path("secret.jpg")
    if exists:
        path.write_bytes(JPEG)
    with pytest.raises(ImageError) as caught:
        classify_images([JPEG, str(path)])
    expected = (
        "image 2 ('secret.jpg') is a str that is neither an http(s) URL nor a data: URI; "
        "a str is never read as a local file: pass pathlib.Path(...) for a file"
    )
    assert str(caught.value) == expected  # the same whether the file exists or not
    assert caught.value.index == 1
    assert _one(path).kind == "path"  # the Path of the same file is read


# --------------------------------------------------------------------------- inspect


def test_inspect_reports_the_header_facts() -> None:
    info, notes = inspect_image(JPEG, index=0, source="x")
    assert info == ImageInfo("jpeg", 64, 48, len(JPEG))
    assert info.displayed_size == (64, 48)
    assert notes == []
    png_info, _ = inspect_image(memoryview(PNG), index=0, source="x")
    assert (png_info.format, png_info.width, png_info.height) == ("png", 40, 40)


def test_size_refusal_names_limit_and_value() -> None:
    limits = Limits(max_image_bytes=1000)
    with pytest.raises(
        ImageError,
        match=rf"^image 2 \(big\.jpg\) is {len(JPEG):,} bytes; the limit is 1,000 bytes",
    ):
        inspect_image(JPEG, index=1, source="big.jpg", limits=limits)


def _padded_jpeg(total: int) -> bytes:
    """``JPEG`` grown to exactly ``total`` bytes with COM segments before its frame."""
    need = total - len(JPEG)
    segments = []
    while need > 0:
        size = min(need, 65537)
        if 0 < need - size < 4:  # keep room for a last segment's 4-byte header
            size -= 4
        segments.append(b"\xff\xfe" + (size - 2).to_bytes(2, "big") + bytes(size - 4))
        need -= size
    data = JPEG[:2] + b"".join(segments) + JPEG[2:]
    assert len(data) == total
    return data


def test_the_default_size_limit_is_4_7_million_bytes() -> None:
    at_limit = _padded_jpeg(4_700_000)
    assert inspect_image(at_limit, index=0, source="x")[0].size == 4_700_000
    with pytest.raises(ImageError, match=r"is 4,700,001 bytes; the limit is 4,700,000 bytes"):
        inspect_image(_padded_jpeg(4_700_001), index=0, source="x")


def test_resolution_refusal_names_limit_and_value() -> None:
    limits = Limits(max_image_width=50, max_image_height=50)
    with pytest.raises(
        ImageError, match=r"^image 1 \(x\) is 64 x 48 pixels; the limit is 50 x 50$"
    ):
        inspect_image(JPEG, index=0, source="x", limits=limits)


def test_4096_square_passes_and_one_more_pixel_does_not() -> None:
    for width, height, ok in [(4096, 4096, True), (4097, 4096, False), (4096, 4097, False)]:
        data = with_sof_field(JPEG, 5, height.to_bytes(2, "big") + width.to_bytes(2, "big"))
        if ok:
            assert inspect_image(data, index=0, source="x")[0].width == 4096
        else:
            with pytest.raises(ImageError, match=rf"is {width} x {height} pixels"):
                inspect_image(data, index=0, source="x")


def test_aspect_ratio_error_by_default_with_a_hint() -> None:
    with pytest.raises(
        ImageError,
        match=r"^image 1 \(tall\.jpg\) has an aspect ratio of 0\.25 \(100 x 400\); the service "
        r"recommends 0\.56 \(9:16\) to 1\.78 \(16:9\).*aspect_policy='warn'",
    ):
        inspect_image(TALL_JPEG, index=0, source="tall.jpg")


def test_aspect_ratio_warn_returns_the_text_and_off_skips_it() -> None:
    info, notes = inspect_image(
        TALL_JPEG, index=0, source="tall.jpg", limits=Limits(aspect_policy=CheckPolicy.WARN)
    )
    assert info.height == 400
    assert len(notes) == 1
    assert "aspect ratio of 0.25" in notes[0]
    assert (
        inspect_image(TALL_JPEG, index=0, source="t", limits=Limits(aspect_policy="off"))[1] == []
    )


def test_exact_16_9_and_9_16_pass() -> None:
    for size in [(1664, 936), (936, 1664), (1920, 1080)]:
        data = jpeg_bytes(noise_image(*size))
        assert inspect_image(data, index=0, source="x")[0].width == size[0]


def test_aspect_uses_the_displayed_orientation() -> None:
    """Stored 400 x 240 with EXIF orientation 6 is shown 240 x 400: judged as displayed."""
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6
    data = jpeg_bytes(noise_image(400, 240), exif=exif.tobytes())
    landscape_only = Limits(min_aspect_ratio=1.0, max_aspect_ratio=2.0)
    with pytest.raises(ImageError, match=r"240 x 400 as displayed"):
        inspect_image(data, index=0, source="x", limits=landscape_only)
    info, _ = inspect_image(data, index=0, source="x")
    assert (info.width, info.height, info.orientation) == (400, 240, 6)
    assert info.displayed_size == (240, 400)


def test_resolution_uses_the_stored_size() -> None:
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 8
    data = jpeg_bytes(noise_image(300, 200), exif=exif.tobytes())
    limits = Limits(max_image_width=300, max_image_height=200, aspect_policy="off")
    assert inspect_image(data, index=0, source="x", limits=limits)[0].orientation == 8


# --------------------------------------------------------------------------- prepare: URLs


async def test_urls_alone_pass_through_without_io() -> None:
    async def fetch(url: str, cap: int) -> bytes:
        raise AssertionError("must not download")

    urls = ["https://a.example/1.jpg", "http://b.example/2.png?sig=1"]
    prepared = await _prepare(*urls, fetch=fetch)
    assert prepared.urls == tuple(urls)
    assert prepared.base64 == ()
    assert prepared.infos == (None, None)


async def test_mixed_urls_are_downloaded_concurrently_and_sent_as_base64() -> None:
    started: list[str] = []
    both_started = asyncio.Event()

    async def fetch(url: str, cap: int) -> bytes:
        assert cap == DEFAULT_LIMITS.max_image_bytes
        started.append(url)
        if len(started) == 2:
            both_started.set()
        await asyncio.wait_for(both_started.wait(), 2)  # deadlocks unless concurrent
        return PNG if url.endswith(".png") else JPEG

    prepared = await _prepare(
        "https://x.example/a.png", JPEG, "https://x.example/b.jpg", fetch=fetch
    )
    assert prepared.urls == ()
    assert _decoded(prepared) == [PNG, JPEG, JPEG]
    assert [info.format for info in prepared.infos if info] == ["png", "jpeg", "jpeg"]


async def test_mixed_urls_without_a_downloader_are_refused() -> None:
    with pytest.raises(ImageError, match=r"^image 2 \(x\.example/a\.png\) is a URL mixed"):
        await _prepare(JPEG, "https://x.example/a.png")


async def _hang_until_cancelled(cancelled: asyncio.Event) -> bytes:
    """A download that never ends; sets ``cancelled`` when it is cancelled."""
    try:
        await asyncio.sleep(10)
    except asyncio.CancelledError:
        cancelled.set()
        raise
    return JPEG


async def test_a_failed_download_names_the_image_and_cancels_the_others() -> None:
    cancelled = asyncio.Event()

    async def fetch(url: str, cap: int) -> bytes:
        if "bad" in url:
            await asyncio.sleep(0.01)
            raise ConnectionResetError("peer reset")
        return await _hang_until_cancelled(cancelled)

    with pytest.raises(
        ImageError, match=r"^image 3 \(x\.example/bad\.jpg\) could not be downloaded"
    ) as caught:
        await _prepare(
            JPEG, "https://x.example/slow.jpg", "https://x.example/bad.jpg?k=1", fetch=fetch
        )
    assert isinstance(caught.value.__cause__, ConnectionResetError)
    assert cancelled.is_set()


async def test_a_downloaded_file_is_checked_like_a_local_one() -> None:
    async def fetch(url: str, cap: int) -> bytes:
        return b"<!DOCTYPE html><p>Access denied</p>"

    with pytest.raises(ImageError, match=r"^image 2 \(cdn\.example/p\.jpg\) is an HTML page"):
        await _prepare(JPEG, "https://cdn.example/p.jpg", fetch=fetch)


async def test_a_lax_downloader_returning_too_much_is_refused() -> None:
    async def fetch(url: str, cap: int) -> bytes:
        return JPEG

    limits = Limits(max_image_bytes=len(JPEG) - 1)
    tiny = jpeg_bytes(noise_image(8, 8))
    with pytest.raises(ImageError, match=rf"^image 2 \(x\.example/a\.jpg\) is {len(JPEG):,} bytes"):
        await _prepare(tiny, "https://x.example/a.jpg", fetch=fetch, limits=limits)


async def test_cancelling_during_downloads_cancels_them() -> None:
    entered = asyncio.Event()
    cancelled = asyncio.Event()

    async def fetch(url: str, cap: int) -> bytes:
        entered.set()
        return await _hang_until_cancelled(cancelled)

    job = asyncio.ensure_future(_prepare(JPEG, "https://x.example/a.jpg", fetch=fetch))
    await entered.wait()
    job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job
    assert cancelled.is_set()


# --------------------------------------------------------------------------- prepare: local


async def test_every_local_kind_is_read_checked_and_encoded(jpeg_file: Path) -> None:
    prepared = await _prepare(
        jpeg_file,
        jpeg_file,
        io.BytesIO(PNG),
        bytearray(JPEG),
        memoryview(PNG),
        _data_uri(JPEG),
    )
    assert _decoded(prepared) == [JPEG, JPEG, PNG, JPEG, PNG, JPEG]
    assert all(item.isascii() for item in prepared.base64)
    assert [info.size for info in prepared.infos if info] == [len(JPEG)] * 2 + [len(PNG)] + [
        len(JPEG), len(PNG), len(JPEG)]  # fmt: skip


async def test_files_are_read_lazily_when_the_job_runs(tmp_path: Path) -> None:
    path = tmp_path / "later.jpg"
    sources = classify_images([path])  # the file does not exist yet
    path.write_bytes(JPEG)
    assert _decoded(await prepare_images(sources)) == [JPEG]
    path.write_bytes(PNG)  # changed after the request was built: the job reads what is there
    assert _decoded(await prepare_images(sources)) == [PNG]


async def test_the_content_decides_not_the_extension(tmp_path: Path) -> None:
    path = tmp_path / "photo.jpg"
    path.write_bytes(PNG)
    prepared = await _prepare(path)
    assert prepared.infos[0] is not None
    assert prepared.infos[0].format == "png"
    path.write_bytes(jpeg_bytes(noise_image(8, 8)).replace(b"\xff\xd8\xff", b"GIF89a", 1))
    with pytest.raises(ImageError, match=r"^image 1 \(.*/photo\.jpg\) is GIF"):
        await _prepare(path)


async def test_missing_files_and_directories_are_image_errors(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"^image 1 \(.*/nope\.jpg\) does not exist"):
        await _prepare(tmp_path / "nope.jpg")
    with pytest.raises(ImageError, match=r"is a directory"):
        await _prepare(tmp_path)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs a non-root POSIX user")
async def test_unreadable_files_are_image_errors(jpeg_file: Path) -> None:
    os.chmod(jpeg_file, 0)
    with pytest.raises(ImageError, match=r"could not be read: Permission denied"):
        await _prepare(jpeg_file)


async def test_a_huge_file_is_refused_by_its_size_without_reading_it(tmp_path: Path) -> None:
    path = tmp_path / "huge.jpg"
    with path.open("wb") as handle:
        handle.write(JPEG)
        handle.truncate(10**12)  # 1 TB, sparse: reading it would take hours
    with pytest.raises(
        ImageError,
        match=r"^image 1 \(.*/huge\.jpg\) is 1,000,000,000,000 bytes; the limit is 4,700,000 bytes",
    ):
        await asyncio.wait_for(_prepare(path), 5)


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
async def test_an_endless_device_is_read_only_up_to_the_limit() -> None:
    with pytest.raises(ImageError, match=r"is larger than that; the limit is 1,000 bytes"):
        await _prepare(Path("/dev/zero"), limits=Limits(max_image_bytes=1000))


class _CountingStream(io.RawIOBase):
    """An endless raw stream that returns short reads and counts what it gave."""

    def __init__(self) -> None:
        self.given = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        size = min(len(buffer), 1000)
        buffer[:size] = b"\xff" * size
        self.given += size
        return size


async def test_a_file_object_is_read_at_most_one_byte_past_the_limit() -> None:
    stream = _CountingStream()
    with pytest.raises(ImageError, match=r"the limit is 50,000 bytes"):
        await _prepare(stream, limits=Limits(max_image_bytes=50_000))
    assert stream.given == 50_001


async def test_file_objects_are_read_from_their_position_which_is_restored() -> None:
    handle = io.BytesIO(b"junk" + JPEG)
    handle.seek(4)
    sources = classify_images([handle])
    assert _decoded(await prepare_images(sources)) == [JPEG]
    assert handle.tell() == 4
    assert _decoded(await prepare_images(sources)) == [JPEG]  # the same request, again


async def test_a_file_object_returning_text_is_an_image_error() -> None:
    class TextReader:
        def read(self, size: int = -1) -> str:
            return "not bytes"

    with pytest.raises(ImageError, match=r"returned text; open the file in binary mode"):
        await _prepare(TextReader())


async def test_non_contiguous_and_typed_memoryviews() -> None:
    doubled = bytes(b for byte in JPEG for b in (byte, 0))
    strided = memoryview(doubled)[::2]
    assert not strided.c_contiguous
    padded = PNG + bytes(-len(PNG) % 4)  # data after IEND is allowed
    words_of_png = array.array("I")
    words_of_png.frombytes(padded)
    typed = memoryview(words_of_png)  # format "I": 4-byte items
    words = memoryview(array.array("I", [0] * 4))
    assert _decoded(await _prepare(strided, typed)) == [JPEG, padded]
    with pytest.raises(ImageError, match="not a recognisable image"):
        await _prepare(words)


async def test_data_uris_decode_leniently_but_refuse_garbage() -> None:
    encoded = base64.b64encode(JPEG).decode()
    mime_lines = "\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76))
    url_safe = base64.urlsafe_b64encode(PNG).decode()
    prepared = await _prepare(
        "data:image/jpeg;base64," + mime_lines, "DATA:image/png;BASE64," + url_safe
    )
    assert _decoded(prepared) == [JPEG, PNG]
    with pytest.raises(ImageError, match=r"^image 1 \(<data URI>\) has invalid base64 data"):
        await _prepare("data:image/jpeg;base64,@@@@")


async def test_an_oversized_data_uri_is_refused_before_decoding() -> None:
    uri = "data:image/jpeg;base64," + "A" * 8_000_000
    with pytest.raises(ImageError, match=r"the limit is 4,700,000 bytes"):
        await _prepare(uri)


async def test_an_error_names_the_failing_image_among_several(jpeg_file: Path) -> None:
    with pytest.raises(ImageError, match=r"^image 3 \(<bytes 3 B>\) is not a recognisable"):
        await _prepare(jpeg_file, PNG, b"\x00\x01\x02", JPEG)


# --------------------------------------------------------------------------- threads, warnings


async def test_reading_and_encoding_run_in_one_worker_thread() -> None:
    loop_thread = threading.get_ident()
    seen: list[int] = []

    class Recording(io.BytesIO):
        def read(self, size: int | None = -1) -> bytes:
            seen.append(threading.get_ident())
            return super().read(size)

    await _prepare(Recording(JPEG), Recording(PNG))
    assert seen
    assert loop_thread not in seen
    assert len(set(seen)) == 1


async def test_aspect_warnings_are_emitted_on_the_loop_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    emitted: list[tuple[str, int]] = []
    real_warn = warnings.warn

    def recording_warn(message: str, category: type[Warning], stacklevel: int = 1) -> None:
        emitted.append((message, threading.get_ident()))
        real_warn(message, category, stacklevel=stacklevel + 1)

    monkeypatch.setattr(warnings, "warn", recording_warn)
    limits = Limits(aspect_policy="warn")
    with pytest.warns(
        DreamOWarning, match=r"^image 2 \(<bytes \d+ B>\) has an aspect ratio of 0\.25"
    ):
        prepared = await _prepare(JPEG, TALL_JPEG, limits=limits)
    assert len(prepared.base64) == 2
    assert [thread for _, thread in emitted] == [threading.get_ident()]


async def test_aspect_warnings_point_at_the_line_that_called_prepare_images() -> None:
    # Checked on the loop (small bytes) or in the worker thread (a file object), the
    # warning names the caller's line, not a frame of the library.
    limits = Limits(aspect_policy="warn")
    for item in (TALL_JPEG, io.BytesIO(TALL_JPEG)):
        sources = classify_images([item])
        line = sys._getframe().f_lineno + 2  # the call's line
        with pytest.warns(DreamOWarning) as caught:
            await prepare_images(sources, limits=limits)
        assert [(w.filename, w.lineno) for w in caught] == [(__file__, line)]


# --------------------------------------------------------------------------- memory bound


def _live_after_gc() -> int:
    gc.collect()
    return live_payload_count()


async def test_live_payloads_are_counted_and_released() -> None:
    baseline = _live_after_gc()
    kept = [await _prepare(JPEG) for _ in range(3)]
    assert live_payload_count() == baseline + 3
    urls = await _prepare("https://x.example/a.jpg")
    assert live_payload_count() == baseline + 4
    del kept, urls
    assert _live_after_gc() == baseline


async def test_payloads_alive_at_once_are_bounded_by_the_job_slots() -> None:
    """200 jobs through 4 slots: never more than 4 encoded payloads exist (the issue's bound)."""
    baseline = _live_after_gc()
    slots = asyncio.Semaphore(4)
    peak = 0

    async def job() -> None:
        nonlocal peak
        async with slots:
            prepared = await _prepare(JPEG, PNG)
            peak = max(peak, live_payload_count() - baseline)
            await asyncio.sleep(0)  # the create call, holding the body
            del prepared

    await asyncio.gather(*(job() for _ in range(200)))
    assert 1 <= peak <= 4
    assert _live_after_gc() == baseline


# --------------------------------------------------------------------------- fit mode

SMALL = Limits(max_image_width=200, max_image_height=150, max_image_bytes=12_000)


async def test_fit_leaves_conforming_images_untouched() -> None:
    prepared = await _prepare(JPEG, PNG, fit=True, limits=SMALL)
    assert _decoded(prepared) == [JPEG, PNG]


def _fitted_size(data: bytes) -> tuple[str | None, tuple[int, int]]:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image.format, image.size


async def test_fit_downscales_keeping_the_aspect_ratio() -> None:
    big = jpeg_bytes(noise_image(640, 360), quality=95)
    prepared = await _prepare(big, fit=True, limits=SMALL)
    (out,) = _decoded(prepared)
    fmt, (width, height) = _fitted_size(out)
    assert fmt == "JPEG"
    assert len(out) <= SMALL.max_image_bytes
    assert width <= 200
    assert height <= 150
    assert abs(width / height - 640 / 360) < 0.02  # the same picture, no crop
    assert prepared.infos[0] == ImageInfo("jpeg", width, height, len(out))


async def test_fit_shrinks_a_file_that_is_only_too_many_bytes() -> None:
    noisy = png_bytes(noise_image(180, 120))
    assert len(noisy) > SMALL.max_image_bytes
    (out,) = _decoded(await _prepare(noisy, fit=True, limits=SMALL))
    fmt, (width, height) = _fitted_size(out)
    assert fmt == "JPEG"
    assert len(out) <= SMALL.max_image_bytes
    assert abs(width / height - 1.5) < 0.02


async def test_fit_applies_exif_rotation_to_the_pixels() -> None:
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = jpeg_bytes(noise_image(400, 240), exif=exif.tobytes())
    prepared = await _prepare(rotated, fit=True, limits=SMALL)
    info = prepared.infos[0]
    assert info is not None
    assert info.orientation == 1
    assert info.height > info.width  # upright: as it was displayed


@pytest.mark.parametrize(
    "data",
    [
        png_bytes(noise_image(300, 300, "RGBA")),
        raw_png(300, 200, depth=16, color=0),
        raw_png(300, 200, depth=16, color=6, interlace=1),
        png_bytes(noise_image(300, 200).convert("P")),
        jpeg_bytes(noise_image(300, 200).convert("CMYK")),
    ],
    ids=["rgba", "gray16", "rgba16-interlaced", "palette", "cmyk"],
)
async def test_fit_handles_every_colour_mode(data: bytes) -> None:
    (out,) = _decoded(await _prepare(data, fit=True, limits=SMALL))
    fmt, (width, height) = _fitted_size(out)
    assert fmt == "JPEG"
    assert width <= 200
    assert height <= 150


async def test_fit_reads_files_larger_than_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    path.write_bytes(png_bytes(noise_image(400, 300)))
    prepared = await _prepare(path, fit=True, limits=SMALL)
    assert prepared.infos[0] is not None
    assert prepared.infos[0].width == 200


async def test_fit_does_not_convert_other_formats() -> None:
    gif = io.BytesIO()
    noise_image(64, 48).save(gif, "GIF")
    with pytest.raises(ImageError, match="is GIF"):
        await _prepare(gif.getvalue(), fit=True)


async def test_fit_refuses_decompression_bombs(monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    big = jpeg_bytes(noise_image(400, 300))
    with pytest.raises(ImageError, match=r"too many to decode safely"):
        await _prepare(big, fit=True, limits=SMALL)


@pytest.fixture
def without_pillow(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pillow made unimportable for one test (monkeypatch restores sys.modules after)."""
    for name in [name for name in sys.modules if name == "PIL" or name.startswith("PIL.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "PIL", None)


@pytest.mark.usefixtures("without_pillow")
async def test_fit_without_pillow_says_how_to_install_it() -> None:
    with pytest.raises(ImageError, match=r"pip install 'dreamo_async\[pillow\]'") as caught:
        await _prepare(JPEG, fit=True, limits=Limits(max_image_width=10, max_image_height=10))
    assert isinstance(caught.value.__cause__, ImportError)
    # and nothing else needs Pillow: the stage works without it
    assert _decoded(await _prepare(JPEG, fit=True)) == [JPEG]
    assert _decoded(await _prepare(JPEG)) == [JPEG]


@settings(max_examples=300, deadline=None)
@given(
    width=st.integers(1, 20_000),
    height=st.integers(1, 20_000),
    max_side=st.integers(16, 4096),
    scale=st.floats(0.05, 1.0),
)
def test_fit_sizes_keep_within_limits_and_never_leave_the_aspect_range(
    width: int, height: int, max_side: int, scale: float
) -> None:
    from dreamo_async.images.fit import _whole_pixels

    limits = Limits(max_image_width=max_side, max_image_height=max_side)
    scale = min(scale, max_side / width, max_side / height)
    out_w, out_h = _whole_pixels(width, height, scale, limits)
    assert 1 <= out_w <= max_side
    assert 1 <= out_h <= max_side
    in_range = limits.min_aspect_ratio <= width / height <= limits.max_aspect_ratio
    if in_range and min(width, height) * scale >= 2:
        assert limits.min_aspect_ratio <= out_w / out_h <= limits.max_aspect_ratio
    assert abs(out_w - width * scale) < 1
    assert abs(out_h - height * scale) < 1


async def test_the_stage_limiter_is_one_per_loop_and_leaves_a_core() -> None:
    from dreamo_async.images import stage_limiter

    limiter = stage_limiter()
    assert stage_limiter() is limiter
    assert 1 <= limiter.total_tokens <= max(1, (os.cpu_count() or 2) - 1)


# --------------------------------------------------------------------------- encoded cache


@pytest.fixture
def fresh_cache() -> object:
    from dreamo_async.images.prepare import ENCODED_CACHE

    ENCODED_CACHE.clear()
    yield ENCODED_CACHE
    ENCODED_CACHE.clear()


@pytest.fixture
def encodings(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Sizes of the images base64-encoded by the stage, in order."""
    import pybase64

    seen: list[int] = []
    real = pybase64.b64encode

    def counting(data: bytes) -> bytes:
        seen.append(len(data))
        return bytes(real(data))

    monkeypatch.setattr(pybase64, "b64encode", counting)
    return seen


async def test_the_same_bytes_object_is_encoded_once(
    fresh_cache: object, encodings: list[int]
) -> None:
    image = bytes(bytearray(JPEG))  # an object of this test's own (bytes(JPEG) is JPEG)
    first = await _prepare(image, PNG)
    second = await _prepare(image)
    third = await _prepare(PNG, image)
    assert _decoded(first) == [image, PNG]
    assert _decoded(second) == [image]
    assert _decoded(third) == [PNG, image]
    assert third.infos == (first.infos[1], first.infos[0])
    assert encodings == [len(image), len(PNG)]  # each object once


async def test_equal_but_distinct_bytes_and_mutable_buffers_are_not_shared(
    fresh_cache: object, encodings: list[int]
) -> None:
    buffer = bytearray(JPEG)
    assert _decoded(await _prepare(buffer)) == [JPEG]
    buffer[-3] ^= 0xFF  # the caller changes the image between two requests
    assert _decoded(await _prepare(buffer)) == [bytes(buffer)]
    await _prepare(bytes(bytearray(JPEG)))
    await _prepare(bytes(bytearray(JPEG)))
    assert len(encodings) == 4


async def test_a_cached_image_is_checked_against_each_requests_limits(
    fresh_cache: object,
) -> None:
    image = bytes(bytearray(JPEG))  # 64 x 48
    await _prepare(image)  # accepted and cached
    cases = [
        Limits(max_image_bytes=len(image) - 1),
        Limits(max_image_width=50, max_image_height=50),
        Limits(min_aspect_ratio=1.5, max_aspect_ratio=2.0),
    ]
    for limits in cases:
        with pytest.raises(ImageError) as cached:
            await _prepare(image, limits=limits)
        fresh_cache.clear()  # type: ignore[attr-defined]
        with pytest.raises(ImageError) as uncached:
            await _prepare(image, limits=limits)
        assert str(cached.value) == str(uncached.value)  # same check, same words
        await _prepare(image)  # cached again for the next case
    warn = Limits(min_aspect_ratio=1.5, max_aspect_ratio=2.0, aspect_policy="warn")
    with pytest.warns(DreamOWarning, match="aspect ratio of 1.33"):
        await _prepare(image, limits=warn)


def test_the_cache_keeps_within_its_bounds() -> None:
    from dreamo_async.images import ImageInfo
    from dreamo_async.images.prepare import INLINE_MAX_BYTES, _EncodedCache

    cache = _EncodedCache(max_entries=3, max_bytes=1000)
    info = ImageInfo("png", 1, 1, 1)
    values = [bytes([i]) * 300 for i in range(5)]
    for value in values:
        cache.put(value, info, (b"x",))
    assert len(cache) == 3  # 900 bytes: the two oldest went
    assert cache.get(values[0]) is None
    assert cache.get(values[4]) == (info, (b"x",))
    cache.put(b"y" * 701, info, (b"y",))
    assert len(cache) == 1  # 701 + 300 > 1000: all three older ones went
    big = b"z" * (INLINE_MAX_BYTES + 1)
    cache.put(big, info, (b"z",))
    assert cache.get(big) is None  # large images are never kept
    cache.put(values[4], info, (b"x",))
    assert cache.get(bytes(bytearray(values[4]))) is None  # equal is not the same object

"""Security: size caps, URL schemes, the private-network guard, TLS, the API key, file names.

Over real HTTP against FakeDreamOServer on 127.0.0.1, which the private-network
guard refuses by default: tests that need the client to download from it say
``allow_private_urls=True``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pathlib
import re
import shutil
import ssl
import subprocess
import traceback
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import example, given, settings
from hypothesis import strategies as st

import dreamo_async as d
from dreamo_async._netguard import address_problem, display_url, guarded_socket_factory
from dreamo_async.download import open_exclusive, result_stem
from dreamo_async.testing import ChaosConfig, FakeDreamOServer, Fault, make_png
from dreamo_async.testing.pytest_plugin import ServerFactory

PNG = make_png(64, 64)
KEY = "sk-live-5ecret-0123456789abcdef"
FAST_RETRY = d.RetryPolicy(max_attempts=1)
SMALL = d.Limits(max_response_bytes=1_000_000)


def _client(server: FakeDreamOServer, **options: object) -> d.DreamOClient:
    settings: dict[str, object] = {
        "retry": FAST_RETRY,
        "poll": d.PollPolicy(initial_delay=0.001, max_delay=0.005, timeout=0.5),
        **options,
    }
    return d.DreamOClient(
        api_key=server.api_key or KEY,
        base_url=server.url,
        **settings,  # type: ignore[arg-type]
    )


@contextlib.asynccontextmanager
async def serve_every_get(
    handler: Callable[[web.Request], Awaitable[web.Response]],
) -> AsyncIterator[str]:
    """An aiohttp server on 127.0.0.1 answering every GET with ``handler``; yields its URL."""
    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        await server.close()


# --------------------------------------------------------------------------- size caps


async def test_an_endless_answer_is_cut_off_at_the_cap_with_bounded_memory(
    dreamo_server: FakeDreamOServer,
) -> None:
    dreamo_server.inject("poll", Fault.huge(10**9, chunked=True))  # 1 GB, no Content-Length
    async with _client(dreamo_server, limits=SMALL) as client:
        task = await client.submit(prompt="p", images=[PNG])
        tracemalloc.start()
        try:
            with pytest.raises(d.ResponseFormatError, match="exceeds the 1000000-byte cap") as info:
                await client.get_task(task.id)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert info.value.task_id == task.id
    assert peak < 3 * 1_000_000  # the cap and its copy, never the gigabyte


async def test_a_declared_huge_answer_is_refused_before_reading(
    dreamo_server: FakeDreamOServer,
) -> None:
    dreamo_server.inject("poll", Fault.huge(10**9))  # Content-Length: 1000000000
    async with _client(dreamo_server, limits=SMALL) as client:
        task = await client.submit(prompt="p", images=[PNG])
        with pytest.raises(d.ResponseFormatError, match="of 1000000000 bytes exceeds"):
            await client.get_task(task.id)


async def test_a_huge_create_answer_is_an_unknown_outcome_never_resent(
    dreamo_server: FakeDreamOServer,
) -> None:
    dreamo_server.inject("create", Fault.huge(10**9, chunked=True))
    async with _client(dreamo_server, limits=SMALL) as client:
        with pytest.raises(d.CreateOutcomeUnknownError):
            await client.submit(prompt="p", images=[PNG])
    assert dreamo_server.stats.create_requests == 1
    assert dreamo_server.stats.creates == 1


async def test_downloads_are_capped_and_type_checked(
    dreamo_server: FakeDreamOServer, tmp_path: pathlib.Path
) -> None:
    png_url = dreamo_server.add_file("ok.png", PNG)
    html_url = dreamo_server.add_file("page.png", b"<!DOCTYPE html><html>Login</html>", "image/png")
    async with _client(dreamo_server) as client:
        saved = await client.download(png_url, tmp_path, "00000-t-0")
        assert saved.read_bytes() == PNG
        refused = r"00001-t-0 is an HTML page, not a JPEG, PNG or WebP image"
        with pytest.raises(d.DownloadError, match=refused):
            await client.download(html_url, tmp_path, "00001-t-0")
        dreamo_server.inject("download", Fault.huge(10**9, chunked=True))
        before = dreamo_server.stats.downloads
        with pytest.raises(d.DownloadError, match="more than the 5000-byte cap"):
            await client._transport.download(png_url, 5_000)
        # Over the cap is not a transient failure: the same URL is not fetched again.
        assert dreamo_server.stats.downloads == before + 1
    assert _tree(tmp_path) == ["00000-t-0.png"]


async def test_a_compressed_answer_is_capped_after_inflating(tmp_path: pathlib.Path) -> None:
    """A 50 KB gzip body that inflates to 50 MB: Content-Length says 50 KB, so the cap
    is counted on the inflated bytes, for user URLs and API answers alike."""
    import gzip

    bomb = gzip.compress(b"\0" * 50_000_000)

    async def handler(request: web.Request) -> web.Response:
        return web.Response(
            body=bomb, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}
        )

    async with (
        serve_every_get(handler) as base,
        d.DreamOClient(
            api_key=KEY, base_url=base, allow_private_urls=True, retry=d.RetryPolicy(max_attempts=1)
        ) as client,
    ):
        tracemalloc.start()
        try:
            with pytest.raises(d.DownloadError, match="more than the 1000000-byte cap"):
                await client._transport.download(base + "/a.jpg", 1_000_000, untrusted=True)
            with pytest.raises(d.ResponseFormatError, match="exceeds the"):
                await client.get_task("t1")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert len(bomb) < 100_000
    assert peak < 20_000_000  # the caps (1 MB, 8 MiB) and a chunk, never the 50 MB


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://example.com/a.png",
        "gopher://x/",
        "data:image/png;base64,AA",
        "//x/a",
    ],
)
async def test_only_http_and_https_urls_are_downloaded(url: str) -> None:
    async with d.DreamOClient(api_key="k") as client:
        with pytest.raises(d.InvalidRequestError, match="only http:// and https://"):
            await client._transport.download(url, 1000)
        with pytest.raises(d.InvalidRequestError, match="only http:// and https://"):
            await client._transport.download(url, 1000, untrusted=True)


# --------------------------------------------------------------- private-network guard


@pytest.mark.parametrize(
    ("host", "verdict"),
    [
        ("127.0.0.1", "loopback"),
        ("127.255.0.7", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("fc00::1", "private"),
        ("169.254.169.254", "link-local"),  # cloud metadata
        ("fe80::1", "link-local"),
        ("fe80::1%lo", "link-local"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("100.64.0.1", "not a globally reachable"),  # carrier-grade NAT
        ("192.0.2.1", "private"),  # documentation range
        ("::ffff:127.0.0.1", "embeds 127.0.0.1 is a loopback"),
        ("::ffff:169.254.169.254", "embeds 169.254.169.254 is a link-local"),
        ("2002:a00:1::", "embeds 10.0.0.1 is a private"),  # 6to4 of 10.0.0.1
        ("8.8.8.8", None),
        ("2606:4700:4700::1111", None),
        ("::ffff:8.8.8.8", None),
    ],
)
def test_which_addresses_are_refused(host: str, verdict: str | None) -> None:
    problem = address_problem(host)
    if verdict is None:
        assert problem is None
    else:
        assert problem is not None
        assert verdict in problem


def test_the_socket_factory_refuses_before_creating_a_socket() -> None:
    import socket

    info = (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("169.254.169.254", 80))
    with pytest.raises(OSError, match="not a public address") as raised:
        guarded_socket_factory(info)
    assert "link-local" in raised.value.reason  # type: ignore[attr-defined]
    sock = guarded_socket_factory((socket.AF_INET, socket.SOCK_STREAM, 6, "", ("8.8.8.8", 80)))
    sock.close()


async def test_a_user_url_on_loopback_is_refused_by_default(
    dreamo_server: FakeDreamOServer,
) -> None:
    url = dreamo_server.add_file("ref.png", PNG)
    async with _client(dreamo_server) as client:
        with pytest.raises(d.ImageError, match=r"127\.0\.0\.1 is a loopback address") as info:
            await client.generate(prompt="p", images=[PNG, url])
    assert info.value.index == 1
    assert "allow_private_urls=True" in str(info.value)
    assert dreamo_server.stats.downloads == 0  # never connected
    assert dreamo_server.stats.create_requests == 0


@pytest.mark.parametrize(
    "host",
    ["localhost", "[::ffff:127.0.0.1]", "0.0.0.0", "127.1", "2130706433", "[::1]"],
)
async def test_every_spelling_of_a_loopback_host_is_refused(
    dreamo_server: FakeDreamOServer, host: str
) -> None:
    """Names are checked on their resolved address, at connect time (no DNS rebinding)."""
    url = f"http://{host}:{dreamo_server.port}/assets/ref.png"
    dreamo_server.add_file("ref.png", PNG)
    async with _client(dreamo_server) as client:
        with pytest.raises(d.ImageError, match=r"image 2 .* could not be downloaded"):
            await client.generate(prompt="p", images=[PNG, url])
    assert dreamo_server.stats.downloads == 0


@pytest.mark.parametrize("allow", [False, True])
async def test_a_public_looking_name_that_resolves_to_loopback_is_refused_at_connect_time(
    dreamo_server: FakeDreamOServer, monkeypatch: pytest.MonkeyPatch, allow: bool
) -> None:
    """DNS rebinding: the name means nothing, the address connected to decides."""
    loop = asyncio.get_running_loop()
    real = loop.getaddrinfo

    async def rebinding(host: object, *args: object, **kwargs: object) -> object:
        if host == "images.example.com":
            host = "127.0.0.1"
        return await real(host, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(loop, "getaddrinfo", rebinding)
    dreamo_server.add_file("ref.png", PNG)
    url = f"http://images.example.com:{dreamo_server.port}/assets/ref.png"
    async with _client(dreamo_server, allow_private_urls=allow) as client:
        if allow:
            await client.generate(prompt="p", images=[PNG, url])
        else:
            with pytest.raises(d.ImageError, match=r"127\.0\.0\.1 is a loopback address"):
                await client.generate(prompt="p", images=[PNG, url])
    assert dreamo_server.stats.downloads == (1 if allow else 0)


async def test_allow_private_urls_lets_the_client_fetch_from_the_local_network(
    dreamo_server: FakeDreamOServer,
) -> None:
    url = dreamo_server.add_file("ref.png", PNG)
    async with _client(dreamo_server, allow_private_urls=True) as client:
        result = await client.generate(prompt="p", images=[PNG, url])
    assert result.task_id in dreamo_server.tasks
    assert dreamo_server.stats.downloads == 1
    assert dreamo_server.stats.downloads_with_authorization == 0  # the key never goes there


async def test_urls_alone_are_not_fetched_by_the_client_so_the_guard_does_not_apply(
    dreamo_server: FakeDreamOServer,
) -> None:
    url = dreamo_server.add_file("ref.png", PNG)
    async with _client(dreamo_server) as client:
        await client.generate(prompt="p", images=[url])  # the service fetches it
    assert dreamo_server.last_create_body["input"][0]["params"]["image_urls"] == [url]


# --------------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A self-signed certificate for 127.0.0.1 (needs the openssl command)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    folder = tmp_path_factory.mktemp("tls")
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", str(folder / "key.pem"), "-out", str(folder / "cert.pem"),
        ],
        check=True,
        capture_output=True,
    )
    return folder


async def test_tls_is_verified_and_a_custom_context_must_be_explicit(
    certificate: pathlib.Path, dreamo_server_factory: ServerFactory
) -> None:
    server_side = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_side.load_cert_chain(certificate / "cert.pem", certificate / "key.pem")
    server = await dreamo_server_factory(ssl_context=server_side)
    assert server.url.startswith("https://")
    async with _client(server) as client:
        with pytest.raises(d.APIConnectionError) as info:
            await client.generate(prompt="p", images=[PNG])
    assert isinstance(info.value.__cause__, aiohttp.ClientConnectorCertificateError)
    assert server.stats.create_requests == 0
    trusting = ssl.create_default_context(cafile=str(certificate / "cert.pem"))
    async with _client(server, ssl_context=trusting) as client:
        result = await client.generate(prompt="p", images=[PNG])
    assert result.task_id in server.tasks


@pytest.mark.parametrize("value", [False, 0, "off", True])
def test_certificate_checks_cannot_be_switched_off_with_a_flag(value: object) -> None:
    with pytest.raises(d.ConfigurationError, match="cannot be switched off"):
        d.DreamOClient(api_key="k", ssl_context=value)  # type: ignore[arg-type]


def test_no_code_path_turns_certificate_checks_off() -> None:
    package = pathlib.Path(d.__file__).parent
    pattern = re.compile(r"ssl\s*=\s*False|verify_ssl|CERT_NONE|check_hostname\s*=\s*False")
    offenders = [
        f"{path.name}:{number}"
        for path in package.rglob("*.py")
        if "testing" not in path.parts
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []


# ----------------------------------------------------------------------------- the key


class _Everything(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.texts: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.texts.append(self.format(record))
        self.texts.append(repr(record.args))


def _texts_of(error: BaseException) -> list[str]:
    return [
        str(error),
        repr(error),
        "".join(traceback.format_exception(error)),
        "".join(traceback.TracebackException.from_exception(error, capture_locals=True).format()),
    ]


async def test_the_api_key_never_reaches_logs_errors_reprs_or_tracebacks(
    dreamo_server_factory: ServerFactory,
) -> None:
    handler = _Everything()
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    loggers = [logging.getLogger(n) for n in ("", "aiohttp", "asyncio", "dreamo_async")]
    levels = [logger.level for logger in loggers]
    root.addHandler(handler)
    for logger in loggers:
        logger.setLevel(logging.DEBUG)
    errors: list[BaseException] = []
    texts: list[str] = []
    try:
        server = await dreamo_server_factory(
            api_key=KEY, chaos_config=ChaosConfig.everything(0.08, seed=5, slow_ms=150)
        )
        async with _client(
            server,
            request_timeout=aiohttp.ClientTimeout(sock_read=0.1),
            retry=d.RetryPolicy(max_attempts=2, initial_delay=0, max_delay=0),
        ) as client:
            texts += [repr(client), repr(client._transport), str(client.statistics())]

            async def one(index: int) -> None:
                try:
                    await client.generate(prompt=f"job {index}", images=[PNG])
                except d.DreamOError as exc:
                    errors.append(exc)

            await asyncio.gather(*(one(i) for i in range(60)))
        server.set_chaos(None)
        # A client of its own: the first one's watchers of abandoned tasks, had they
        # polled on, could take the one scripted 401.
        async with _client(server) as client:
            server.inject("poll", Fault.status(401, message=f"invalid key {KEY}"))
            task = await client.submit(prompt="echo", images=[PNG])
            with pytest.raises(d.AuthenticationError) as echoed:
                await client.get_task(task.id)
            # A server echoing the key: redacted from the error (the raw body bytes
            # stay in a transport frame's locals, so no capture_locals check here).
            echo = echoed.value
            texts += [str(echo), repr(echo), "".join(traceback.format_exception(echo))]
            assert "invalid key <redacted>" in str(echo)
            with pytest.raises(d.TaskTimeoutError) as late:
                await client.generate(prompt="[never]", images=[PNG], timeout=0.02)
            errors.append(late.value)
        async with d.DreamOClient(api_key="wrong-" + KEY, base_url=server.url) as wrong:
            texts.append(repr(wrong))
            with pytest.raises(d.AuthenticationError) as refused:
                await wrong.submit(prompt="p", images=[PNG])
            errors.append(refused.value)
    finally:
        root.removeHandler(handler)
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
    assert len({type(e) for e in errors}) >= 4  # a variety of failures was exercised
    assert handler.texts  # DEBUG logging did capture records
    for error in errors:
        texts += _texts_of(error)
    leaks = [line for text in texts + handler.texts for line in text.splitlines() if KEY in line]
    assert leaks == []
    assert "key=...cdef" in repr(client)
    assert server.stats.refused["auth"] == 1  # the key really was sent (and checked)


# ------------------------------------------------------------------------------ files


@settings(max_examples=200, derandomize=True, database=None, deadline=None)
@given(
    st.text(max_size=100)
    | st.lists(st.sampled_from(["..", ".", "/", "\\", "%2e", "%2f", "C:", "\x00", "a"])).map(
        "".join
    )
)
@example("../../.ssh/authorized_keys")
@example("/etc/passwd")
@example("..\\..\\Windows\\win.ini")
@example("..")
def test_a_task_id_from_a_response_never_becomes_a_path(task_id: str) -> None:
    """File names are the client's own (index, task id, n); a task id that could
    name another place is refused, never cleaned up into something else."""
    try:
        stem = result_stem(3, task_id, 0)
    except d.DownloadError:
        return
    assert re.fullmatch(r"00003-[A-Za-z0-9_-][A-Za-z0-9._-]*-0", stem)
    assert ".." not in stem


async def test_a_result_is_saved_under_the_client_s_name_whatever_the_server_says(
    tmp_path: pathlib.Path,
) -> None:
    """The server names the file ``../../evil.sh`` in its URL and Content-Disposition;
    the file lands in the output folder under the name the client made, with the
    extension of its content."""

    async def evil(request: web.Request) -> web.Response:
        return web.Response(
            body=PNG,
            content_type="text/x-shellscript",
            headers={"Content-Disposition": 'attachment; filename="../../evil.sh"'},
        )

    out = tmp_path / "out"
    async with (
        serve_every_get(evil) as base,
        d.DreamOClient(api_key=KEY, base_url=base) as client,
    ):
        saved = await client.download(
            f"{base}/files/..%2F..%2Fevil.sh", out, result_stem(0, "t1", 0)
        )
    assert saved == out / "00000-t1-0.png"
    assert saved.read_bytes() == PNG
    assert _tree(tmp_path) == ["out", "out/00000-t1-0.png"]


def _tree(root: pathlib.Path) -> list[str]:
    return sorted(path.relative_to(root).as_posix() for path in root.rglob("*"))


def test_a_planted_symlink_is_never_followed(tmp_path: pathlib.Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("keep")
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / ".part").symlink_to(outside)
    with pytest.raises(OSError):  # noqa: PT011  # EEXIST or ELOOP, by platform
        open_exclusive(folder / ".part")
    assert outside.read_text() == "keep"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://user:pw@cdn.example:8443/a.png?sig=s3cret#x", "https://cdn.example:8443/a.png"),
        ("http://[::1]:9/p", "http://[::1]:9/p"),
        ("https://cdn.example:99999/a", "<URL>"),
    ],
)
def test_urls_in_messages_carry_no_user_info_or_query(url: str, shown: str) -> None:
    """One helper shows URLs in errors (which reach journals and results.jsonl)."""
    assert display_url(url) == shown
    assert "pw" not in display_url(url, scheme=False)

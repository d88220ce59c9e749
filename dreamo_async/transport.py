"""HTTP to the service: auth, timeouts, one send loop whose retries follow the money state.

This is the only module that sends requests with aiohttp's client. Its exceptions
never leave it: each is mapped to a :mod:`dreamo_async.errors` class and chained.
Creates, polls and downloads all go through :meth:`Transport._send`; what a failure
means is decided from the job's money state (:mod:`dreamo_async.lifecycle`):

* a **create** is re-sent only while nothing can exist: the connection was never
  made (refused, DNS, connect timeout) or the answer was a 429. Once the body may
  have left (a reset, a read timeout, a 5xx), :class:`CreateOutcomeUnknownError`
  is raised and the request is never sent again;
* a **poll of a task that exists** retries connection errors, timeouts, 5xx and 429
  for as long as the job's deadline allows;
* a **one-off poll** or a **download** is idempotent: the same failures, and
  unreadable answers, are retried up to ``RetryPolicy.max_attempts``.

Logging (logger ``dreamo_async.transport``): one DEBUG line per request (method,
path, status, task id, elapsed; never the key) and one per retry.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import secrets
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

import aiohttp
from yarl import URL

from . import __about__
from ._answers import (
    api_answer,
    check_key,
    closed_error,
    error_from_response,
    read_capped,
    stream_capped,
)
from ._body import BodyParts
from ._endpoints import DEFAULT_BASE_URL, Endpoints, task_url_maker
from ._fastpath import plain_within
from ._logging import LOGGER_NAME, TRANSPORT_LOGGER_NAME
from ._netguard import (
    check_url,
    display_url,
    guarded_socket_factory,
    secret_header,
)
from ._pacing import NO_SILENT_RESEND, PACING, PacedConnector
from ._retry_rules import create_retry, hint, hint_ok, idempotent_retry
from .coordination import Priority, RateLimiter, UnlimitedLimiter
from .errors import (
    APIError,
    ClientClosedError,
    ConfigurationError,
    DownloadError,
    DreamOError,
    RateLimitError,
    TaskTimeoutError,
)
from .lifecycle import JobLifecycle
from .limits import DEFAULT_LIMITS, Limits
from .models import Task, TaskStatus
from .retry import RetryPolicy

__all__ = ["DEFAULT_BASE_URL", "Endpoints", "Transport"]

_T = TypeVar("_T")

logger = logging.getLogger(LOGGER_NAME)
#: One DEBUG line per request and per retry.
_request_log = logging.getLogger(TRANSPORT_LOGGER_NAME)
_DEBUG: Final = logging.DEBUG


#: The timeout of a poll when the user set none: one timer for the whole request. The
#: session's ``sock_read`` guard re-arms a timer at every read (two per request); a poll
#: answer is a few hundred bytes, so a deadline on the whole request guards the same
#: stall for half the timer work. A poll that hits it is retried (polls are idempotent).
_POLL_TIMEOUT: Final = aiohttp.ClientTimeout(total=60.0, sock_connect=30.0)
#: The timeout of a small create (a body sent in one buffer) when the user set none:
#: one timer too, as for polls. A create that times out is never sent again, so the
#: deadline must not be spent before the request leaves: ``connect`` bounds the wait
#: for a pooled connection and the connecting (past it aiohttp raises
#: ``ConnectionTimeoutError``: surely not sent, so retried), well inside ``total``.
#: Large bodies keep the session's ``sock_read``: a slow uplink may take long to send
#: 31 MB, and only silence should end it.
_CREATE_TIMEOUT: Final = aiohttp.ClientTimeout(total=90.0, connect=60.0, sock_connect=30.0)
#: The lowest rate a client that learns from its first 429 starts from (requests/s): a
#: client that was nearly idle when a 429 came (a key shared with others) is not
#: throttled to a crawl; the learned limiter cuts further on the next 429s.
_MIN_LEARNED_START: Final = 5
#: How long past a job's deadline a retried poll's answer is awaited.
_DEADLINE_GRACE_S: Final = 0.05


class Transport:
    """One aiohttp session and the rules for talking to the service through it.

    The session is created lazily inside the running loop, so a client can be
    built outside any loop. ``api_key`` is held privately and never printed.
    """

    def __init__(
        self,
        *,
        api_key: str | None,
        endpoints: Endpoints,
        retry: RetryPolicy,
        limiter: RateLimiter | None = None,
        limits: Limits = DEFAULT_LIMITS,
        timeout: aiohttp.ClientTimeout | None = None,
        max_connections: int = 100,
        rng: random.Random | None = None,
        allow_private_urls: bool = False,
        ssl_context: ssl.SSLContext | None = None,
        learn_limiter: Callable[[float], RateLimiter] | None = None,
    ) -> None:
        check_key(api_key)
        if ssl_context is not None and not isinstance(ssl_context, ssl.SSLContext):
            # aiohttp takes ``False`` to mean "no certificate checks": never by accident here.
            raise ConfigurationError(
                f"ssl_context must be an ssl.SSLContext (or None for the system's trusted "
                f"certificates), got {ssl_context!r}; certificate verification cannot be "
                "switched off with a flag"
            )
        self._api_key = api_key
        self._auth = {"Authorization": secret_header(f"Bearer {api_key}")} if api_key else None
        self.allow_private_urls = allow_private_urls
        self._ssl: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True
        self._user_session: aiohttp.ClientSession | None = None
        self.endpoints = endpoints
        #: Endpoints is frozen: the URLs' fixed parts are computed once, not per request.
        self._create_url = URL(endpoints.create_url)
        self._task_url = task_url_maker(endpoints)
        self.retry = retry
        self.limiter: RateLimiter = limiter or UnlimitedLimiter()
        #: The unlimited limiter, whose acquire is skipped while it was never paused; None
        #: for any other limiter, and then requests are paced: new connections take a
        #: second rate slot (PacedConnector) and the limiter records each status.
        self._unlimited = self.limiter if type(self.limiter) is UnlimitedLimiter else None
        #: Makes the limiter that replaces the unlimited one at the first 429 (the
        #: default client learns the service's rate, as ``"auto"``); None: never.
        self._learn = learn_limiter if self._unlimited is not None else None
        #: Answers other than 429 while a rate may be learned, counted from when the
        #: session was made: the service's rate seen before its first 429.
        self._answers = 0
        self._answers_since: float | None = None
        self.limits = limits
        self._timeout = timeout or aiohttp.ClientTimeout(
            total=None, connect=None, sock_connect=30.0, sock_read=60.0
        )
        #: Per-request timeout of polls: the session's when the user set one.
        self._poll_timeout = _POLL_TIMEOUT if timeout is None else self._timeout
        #: Per-request timeout of small creates: the session's when the user set one.
        self._create_timeout = _CREATE_TIMEOUT if timeout is None else self._timeout
        self._max_connections = max_connections
        self._rng = rng or random.Random()
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------

    @property
    def session(self) -> aiohttp.ClientSession:
        """The session, created on first use inside the running loop."""
        if self._closed:
            raise closed_error()
        if self._session is None:
            # Without a rate there is nothing to pace: the plain connector saves a
            # coroutine layer per request.
            connector_class = PacedConnector if self._unlimited is None else aiohttp.TCPConnector
            connector = connector_class(
                limit=self._max_connections, enable_cleanup_closed=False, ssl=self._ssl
            )
            self._session = self._new_session(connector)
            self._answers_since = asyncio.get_running_loop().time()
        return self._session

    @property
    def user_session(self) -> aiohttp.ClientSession:
        """The session for URLs users give (input images): public addresses only.

        Separate from the API session: no Authorization, no cookies, and unless
        ``allow_private_urls`` every connection's resolved address is checked as
        the socket is made (DNS rebinding, redirects and IP literals included).
        """
        if self._closed:
            raise closed_error()
        if self._user_session is None:
            connector = aiohttp.TCPConnector(
                limit=self._max_connections,
                ssl=self._ssl,
                socket_factory=None if self.allow_private_urls else guarded_socket_factory,
            )
            self._user_session = self._new_session(connector, cookie_jar=aiohttp.DummyCookieJar())
        return self._user_session

    def _new_session(self, connector: aiohttp.BaseConnector, **extra: Any) -> aiohttp.ClientSession:
        """A session with the options both sessions share: timeout, User-Agent, no
        environment proxies, statuses left to the caller."""
        return aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            headers={"User-Agent": f"dreamo_async/{__about__.__version__}"},
            raise_for_status=False,
            trust_env=False,
            **extra,
        )

    @property
    def is_open(self) -> bool:
        return any(s is not None and not s.closed for s in (self._session, self._user_session))

    async def aclose(self) -> None:
        """Close the sessions and their connections."""
        self._closed = True
        for session in (self._session, self._user_session):
            if session is not None and not session.closed:
                await session.close()

    def _auth_headers(self) -> dict[str, str]:
        """The Authorization header (built once: the key never changes; never mutated)."""
        if self._auth is None:
            raise ConfigurationError(
                "no API key: pass DreamOClient(api_key=...) or set DREAMO_API_KEY "
                "(or VTRIX_API_KEY) in the environment"
            )
        return self._auth

    # -- the three calls ------------------------------------------------------------

    async def create(
        self,
        body: bytes | BodyParts,
        *,
        request_id: str | None = None,
        before_send: Callable[[str], Awaitable[None]] | None = None,
        lifecycle: JobLifecycle | None = None,
    ) -> Task:
        """Send a create request; retried only while no task can exist.

        ``before_send(request_id)`` is awaited once, before the rate slot is taken (a
        slow hook must not spend a slot granted for now): a journal records "outcome
        unknown from here on" durably before any task can exist. Only a documented
        refusal (400-class with a provider code, 401, 403, 429) or a connection never
        made means no task exists; any other failure after the body may have left
        raises :class:`CreateOutcomeUnknownError`, never re-sent. ``lifecycle`` is moved
        along as the body leaves, is refused, makes a task or meets an unknown outcome.
        """
        request_id = request_id or secrets.token_hex(16)
        job = lifecycle if lifecycle is not None else JobLifecycle()
        headers = {
            **self._auth_headers(),
            "Content-Type": "application/json",
            "X-Request-Id": request_id,
        }
        if before_send is not None:
            await before_send(request_id)
        return await self._send(
            "POST",
            self._create_url,
            api_answer,
            headers=headers,
            body=body,
            timeout=self._create_timeout if type(body) is bytes else self._timeout,
            priority=Priority.CREATE,
            job=job,
            request_id=request_id,
        )

    async def get_task(self, task_id: str, *, deadline: float | None = None) -> Task:
        """One poll of a task (retried on transient failures); errors name the task.

        Without ``deadline`` (a one-off poll) failures are retried up to
        ``RetryPolicy.max_attempts``. With one (the loop-clock time a job's deadline
        falls, ``math.inf`` for none) the task exists and is paid: connection errors,
        5xx and 429 are retried for as long as the deadline allows, and no backoff
        sleeps past it (:class:`TaskTimeoutError` then). Unreadable answers are
        retried up to ``max_attempts`` either way, then raise ResponseFormatError.
        """
        try:
            task: Task = await self._send(
                "GET",
                self._task_url(task_id),
                api_answer,
                headers=self._auth_headers(),
                timeout=self._poll_timeout,
                priority=Priority.POLL,
                deadline=deadline,
                name=task_id,
            )
        except DreamOError as exc:
            if exc.task_id is None:  # the caller can resume or report it
                exc.task_id = task_id
            raise
        if task.status is TaskStatus.COMPLETED or task.status is TaskStatus.FAILED:
            logger.info("task %s ended: %s", task.id, task.raw_status or task.status.value)
        return task

    async def download(self, url: str, max_bytes: int, *, untrusted: bool = False) -> bytes:
        """GET ``url`` into memory, streamed and capped at ``max_bytes``; retried.

        For input images given as URLs (a few MB at most); results go to disk with
        :meth:`download_stream`. Same rules: see there.
        """
        chunks: list[bytes] = []

        def begin() -> Callable[[bytes], None]:
            chunks.clear()  # a retry starts afresh
            return chunks.append

        await self.download_stream(url, max_bytes, begin, untrusted=untrusted)
        return b"".join(chunks)

    async def download_stream(
        self,
        url: str,
        max_bytes: int,
        begin: Callable[[], Callable[[bytes], None]],
        *,
        untrusted: bool = False,
    ) -> int:
        """GET ``url`` streamed chunk by chunk into a sink; retried; returns the byte count.

        Only ``http``/``https``. ``untrusted=True`` (a URL a user gave) goes through
        :attr:`user_session`: private, loopback and link-local addresses are refused
        unless ``allow_private_urls``. ``begin()`` is called at the start of every
        attempt and returns the sink for that attempt's chunks (so a retry starts a
        fresh file). More than ``max_bytes`` — counted after decompression, so a
        small gzip bomb cannot get past the cap — raises :class:`DownloadError` at
        once: the same URL would only send the same bytes again. Downloads are not
        API calls: the rate limiter does not count them.
        """
        check_url(url, allow_private=self.allow_private_urls or not untrusted)
        shown = display_url(url)

        def over_cap(declared: int | None) -> DownloadError:
            if declared is not None:
                return DownloadError(f"{shown}: {declared} bytes exceed the {max_bytes}-byte cap")
            return DownloadError(f"{shown}: more than the {max_bytes}-byte cap")

        async def stream(response: aiohttp.ClientResponse) -> int | APIError:
            if response.status != 200:
                payload = await read_capped(response, self.limits.max_response_bytes)
                return self._error(response.status, payload, response, None)
            return await stream_capped(response, max_bytes, begin(), over_cap)

        return await self._send(
            "GET", url, None, stream=stream, untrusted=untrusted, timeout=self._timeout, name=shown
        )

    # -- the send loop ----------------------------------------------------------------

    async def _send(
        self,
        method: str,
        url: URL | str,
        read: Callable[
            [Callable[[str], str], aiohttp.ClientResponse, bytes, str | None, JobLifecycle | None],
            _T | APIError,
        ]
        | None,
        *,
        stream: Callable[[aiohttp.ClientResponse], Awaitable[_T | APIError]] | None = None,
        headers: dict[str, str] | None = None,
        body: bytes | BodyParts | None = None,
        timeout: aiohttp.ClientTimeout,
        priority: Priority | None = None,
        job: JobLifecycle | None = None,
        request_id: str | None = None,
        deadline: float | None = None,
        name: str | None = None,
        untrusted: bool = False,
    ) -> _T:
        """Send one request until it succeeds or its money state forbids another try.

        ``priority`` marks an API call (paced by the limiter, redirects never followed);
        ``job`` marks a create (re-sent only while nothing can exist); ``deadline`` marks
        the poll of a task that exists (transient failures retried until it). ``read``
        turns an answer's capped body into the result or an :class:`APIError` value;
        a download gives ``stream`` instead, which reads the body itself.
        """
        paced = priority is not None
        attempt = 0
        while True:
            attempt += 1
            if attempt > 1 and deadline is not None and deadline != math.inf:
                # A retry never outlives the job's deadline (the first attempt's caller
                # arms its own timer when the deadline is near).
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining < (timeout.total or math.inf):
                    timeout = aiohttp.ClientTimeout(
                        total=max(remaining, 0.0) + _DEADLINE_GRACE_S, sock_connect=30.0
                    )
            # The limiter of this attempt: its answer is recorded into the limiter that
            # granted it (not into one learned meanwhile from other requests' 429s).
            limiter, unlimited = self.limiter, self._unlimited
            pacing = None
            if paced:
                if unlimited is None or not unlimited.never_paused:
                    await limiter.acquire(priority)  # type: ignore[arg-type]
                if unlimited is None:
                    pacing = PACING.set(limiter)
            debug = _request_log.isEnabledFor(_DEBUG)
            started = asyncio.get_running_loop().time() if debug else 0.0
            if job is not None:
                job.sending(request_id)  # type: ignore[arg-type]
            status: int | None = None
            try:
                session = self.user_session if untrusted else self.session
                async with session.request(
                    method,
                    url,
                    data=body,
                    headers=headers,
                    timeout=timeout,
                    # API calls: a redirect is an answer, never a second request.
                    allow_redirects=not paced,
                    # Paced polls only: without a limiter a re-send costs no slot (and
                    # the middleware costs every poll a coroutine).
                    middlewares=NO_SILENT_RESEND if pacing is not None and job is None else None,
                ) as response:
                    status = response.status
                    if paced:
                        if unlimited is None:  # UnlimitedLimiter.record does nothing
                            limiter.record(status)
                        elif self._learn is not None and status != 429:
                            self._answers += 1
                    if read is not None:
                        cap = self.limits.max_response_bytes
                        if plain_within(response, cap):  # every poll: no coroutine
                            payload = await response.read()
                        else:
                            payload = await read_capped(response, cap, request_id)
                        outcome = read(self._redact, response, payload, request_id, job)
                    else:
                        assert stream is not None
                        outcome = await stream(response)
                if debug:
                    self._log(method, url, status, outcome, name if paced else None, started)
                if not isinstance(outcome, APIError):
                    return outcome
                error: Exception = outcome
                answered = True
            except (ConfigurationError, ClientClosedError):
                raise
            except Exception as exc:
                if debug:
                    self._log(method, url, status, exc, name if paced else None, started)
                error, answered = exc, False
            finally:
                if pacing is not None:
                    PACING.reset(pacing)
            if job is not None:
                retry_hint = create_retry(
                    self.retry, error, attempt, job, answered, self._on_rate_limited
                )
            else:
                retry_hint = idempotent_retry(
                    self.retry, error, attempt, name, deadline is not None, self._on_rate_limited
                )
            await self._backoff(attempt, retry_hint, method, name, error, deadline=deadline)
            if deadline is not None and asyncio.get_running_loop().time() >= deadline:
                raise TaskTimeoutError(name or "", 0.0)

    def _accepted_rate(self) -> float:
        """Answers other than 429 per second so far: the count itself within the first
        second (a storm at start), the mean rate after it."""
        since = self._answers_since
        elapsed = 0.0 if since is None else asyncio.get_running_loop().time() - since
        return self._answers / elapsed if elapsed > 1.0 else float(self._answers)

    def _on_rate_limited(self, error: RateLimitError) -> None:
        """A 429: every request of the client waits (the hint, or the default pause),
        and a client that had no rate starts learning one (``"auto"``)."""
        if self._learn is not None:
            # Start from what the service accepted in the last second. Requests already
            # granted record into the old limiter (nothing): only answers to requests
            # the learned limiter paced teach it.
            seen = max(self._accepted_rate(), _MIN_LEARNED_START)
            self.limiter, self._unlimited = self._learn(float(seen)), None
            self._learn = None
            logger.info(
                "HTTP 429 without a configured rate: learning the service's rate from %.1f/s",
                seen,
            )
        if hint_ok(self.retry, error):
            self.limiter.pause(hint(self.retry, error))

    async def _backoff(
        self,
        attempt: int,
        hint: float | None,
        method: str,
        name: str | None,
        error: BaseException,
        *,
        deadline: float | None = None,
    ) -> None:
        delay = self.retry.delay(attempt, hint, self._rng)
        _request_log.debug(
            "%s %s: retry %d in %.3f s after %s",
            method,
            name or "create",
            attempt,
            delay,
            type(error).__name__,
        )
        if deadline is not None:
            delay = min(delay, max(0.0, deadline - asyncio.get_running_loop().time()))
        if delay > 0:
            await asyncio.sleep(delay)

    def _log(
        self,
        method: str,
        url: URL | str,
        status: int | None,
        outcome: object,
        name: str | None,
        started: float,
    ) -> None:
        """The DEBUG line of one request: never a header, so never the key."""
        path = URL(url).path if isinstance(url, str) else url.path
        task_id = outcome.id if isinstance(outcome, Task) else name
        elapsed = (asyncio.get_running_loop().time() - started) * 1000
        _request_log.debug(
            "%s %s -> %s task=%s %.1f ms",
            method,
            path,
            status if status is not None else type(outcome).__name__,
            task_id or "-",
            elapsed,
        )

    def _error(
        self,
        status: int,
        payload: bytes,
        response: aiohttp.ClientResponse,
        request_id: str | None,
        *,
        api: bool = False,
    ) -> APIError:
        return error_from_response(
            status, payload, response, request_id, self._redact, name_url=api
        )

    def _redact(self, text: str) -> str:
        key = self._api_key
        if not key or key not in text:
            return text
        return text.replace(key, "<redacted>")

    def __repr__(self) -> str:
        key = "set" if self._api_key else "missing"
        return f"<Transport {self.endpoints.base_url} key={key}>"

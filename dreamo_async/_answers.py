"""The service's answers, read: capped, parsed into a task, or mapped to a typed error.

Pure functions of an aiohttp response (no retries, no state): the transport's send
loop calls them and decides from the job's money state what a failure means.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any, Final

import aiohttp

from ._fastpath import plain_within
from .errors import (
    PROVIDER_ERROR_CODES,
    APIError,
    ClientClosedError,
    ConfigurationError,
    CreateOutcomeUnknownError,
    DreamOError,
    RateLimitError,
    ResponseFormatError,
)
from .lifecycle import JobLifecycle
from .models import Task
from .retry import parse_retry_after
from .wire import error_class_for_status, parse_error_body, parse_task

__all__ = [
    "api_answer",
    "check_key",
    "closed_error",
    "created_task",
    "documented_refusal",
    "error_from_response",
    "identity",
    "polled_task",
    "read_capped",
    "read_json",
    "stream_capped",
]

#: Bytes asked of aiohttp per chunk when an answer is counted as it arrives.
_CHUNK: Final = 64 * 1024


def identity(response: aiohttp.ClientResponse) -> bool:
    """Whether the body arrives as sent: no ``Content-Encoding`` for aiohttp to inflate."""
    return response.headers.get("Content-Encoding", "identity").strip().lower() in ("", "identity")


async def stream_capped(
    response: aiohttp.ClientResponse,
    cap: int,
    sink: Callable[[bytes], object],
    over_cap: Callable[[int | None], Exception],
) -> int:
    """The one capped reader: feed the body to ``sink``, refusing more than ``cap`` bytes.

    ``Content-Length`` is the size on the wire: only an uncompressed answer is judged by
    its header; any other is counted as aiohttp inflates it (a gzip bomb stops at the
    cap). ``over_cap(declared)`` makes the error raised. Returns the bytes read.
    """
    declared = response.content_length
    if declared is not None and declared > cap and identity(response):
        raise over_cap(declared)
    size = 0
    async for chunk in response.content.iter_chunked(_CHUNK):
        size += len(chunk)
        if size > cap:
            raise over_cap(None)
        sink(chunk)
    return size


async def read_capped(
    response: aiohttp.ClientResponse, cap: int, request_id: str | None = None
) -> bytes:
    """An API answer in memory, at most ``cap`` bytes (``Limits.max_response_bytes``).

    An uncompressed answer whose ``Content-Length`` is within the cap is read in one
    call (every poll); any other goes through :func:`stream_capped`.
    """
    if plain_within(response, cap):
        return await response.read()

    def over_cap(size: int | None) -> ResponseFormatError:
        what = f"of {size} bytes exceeds" if size is not None else "exceeds"
        return ResponseFormatError(
            f"response {what} the {cap}-byte cap", status=response.status, request_id=request_id
        )

    chunks: list[bytes] = []
    await stream_capped(response, cap, chunks.append, over_cap)
    return b"".join(chunks)


def error_from_response(
    status: int,
    payload: bytes,
    response: aiohttp.ClientResponse,
    request_id: str | None,
    redact: Callable[[str], str],
    *,
    name_url: bool = False,
) -> APIError:
    """The typed error of a non-success answer; ``redact`` hides the key if echoed.

    ``name_url`` (API calls): a 404 names the URL that answered it, since a wrong
    ``base_url`` or path answers 404 as an unknown task id does.
    """
    message, code, body_hint = parse_error_body(payload, response.content_type)
    if message is None:
        kind = response.content_type or "no content type"
        message = f"HTTP {status} {response.reason or ''}".strip() + (
            f" with a non-JSON body ({kind}, {len(payload)} bytes)" if payload else " (empty body)"
        )
    if status == 404 and name_url:
        url = response.url.with_query(None)
        message += f" ({response.method} {url} answered 404; check base_url and the paths)"
    if 300 <= status < 400:
        location = response.headers.get("Location")
        message += (
            f"; redirected to {location!r}, which API calls never follow "
            "(set base_url to the final address)"
            if location
            else "; a redirect without a Location"
        )
    # A server echoing the key (in the message, the code, a Location...) never prints it.
    message = redact(message)
    code = redact(code) if code is not None else None
    cls = error_class_for_status(status)
    if cls is RateLimitError:
        hint = parse_retry_after(response.headers.get("Retry-After"))
        return RateLimitError(
            message,
            retry_after=hint if hint is not None else body_hint,
            status=status,
            code=code,
            request_id=request_id,
        )
    return cls(message, status=status, code=code, request_id=request_id)


#: Statuses after which the service surely made no task (API.md): with the provider's
#: error code for 400 and 422 (a proxy's 400 page proves nothing), always for these.
_REFUSAL_STATUSES: Final = frozenset({401, 403, 429})


def documented_refusal(error: APIError) -> bool:
    """Whether a create's error answer documents that no task was made."""
    if error.status in _REFUSAL_STATUSES:
        return True
    return error.status in (400, 422) and error.code in PROVIDER_ERROR_CODES


def created_task(payload: bytes, status: int, request_id: str) -> Task | APIError:
    """A 2xx create answer: the task, or the service's error (an envelope's), else
    :class:`CreateOutcomeUnknownError` (an empty 204, an odd field: a task may exist)."""
    try:
        return parse_task(read_json(payload, status, request_id))
    except APIError as exc:
        if isinstance(exc, ResponseFormatError) or exc.status is None:
            reason: Exception = exc
        else:  # an envelope's status code: judged as an HTTP status would be
            exc.request_id = request_id
            return exc
    except Exception as exc:  # a field no converter expected (created_at: "²")
        reason = exc
    kind = "an empty" if not payload else "an unreadable"
    raise CreateOutcomeUnknownError(
        f"the service answered the create request with HTTP {status} and {kind} body "
        f"({type(reason).__name__}: {reason})",
        request_id=request_id,
    ) from reason


def polled_task(payload: bytes, status: int) -> Task:
    """A 200 poll answer as a task; anything unreadable is a ResponseFormatError (retried)."""
    try:
        return parse_task(read_json(payload, status, None))
    except DreamOError:
        raise
    except Exception as exc:  # a field no converter expected (created_at: "²")
        raise ResponseFormatError(
            f"the poll answer could not be read ({type(exc).__name__}: {exc})", status=status
        ) from exc


def api_answer(
    redact: Callable[[str], str],
    response: aiohttp.ClientResponse,
    payload: bytes,
    request_id: str | None,
    job: JobLifecycle | None,
) -> Task | APIError:
    """A create's answer (``job`` given: it is marked created at once) or a poll's: the
    task, or the error the answer means."""
    status = response.status
    if job is not None:
        if 200 <= status < 300:
            outcome = created_task(payload, status, request_id or "")
            if isinstance(outcome, Task):
                job.created(outcome.id)
            return outcome
    elif status == 200:
        return polled_task(payload, status)
    return error_from_response(status, payload, response, request_id, redact, name_url=True)


#: The decoder ``json.loads`` uses, called directly (see read_json).
_DECODER: Final = json.JSONDecoder()


def read_json(payload: bytes, status: int, request_id: str | None) -> Mapping[str, Any]:
    """An answer's JSON object, else :class:`ResponseFormatError`."""
    try:
        try:
            # UTF-8 decoded here, then the decoder's scanner: ``json.loads(bytes)`` spends
            # as long guessing the encoding (a UTF-16/32 BOM) and skipping whitespace as
            # parsing a poll answer. Anything but one bare JSON document (whitespace
            # around it, trailing data, another encoding) goes to json.loads, which decides.
            text = payload.decode()
            data, end = _DECODER.raw_decode(text)
            if end != len(text) and not text[end:].isspace():  # a newline after it is fine
                raise ValueError("not one JSON document")
        except ValueError:
            data = json.loads(payload)
    except (ValueError, RecursionError) as exc:  # RecursionError: [[[[... nested too deep
        raise ResponseFormatError(
            f"the answer is not valid JSON ({len(payload)} bytes)",
            status=status,
            request_id=request_id,
        ) from exc
    if type(data) is not dict:  # a JSON object decodes to a dict, and to nothing else
        raise ResponseFormatError(
            f"the answer is JSON {type(data).__name__}, expected an object",
            status=status,
            request_id=request_id,
        )
    return data


def closed_error() -> ClientClosedError:
    """A request after ``aclose`` (a retry that woke up late): typed, never aiohttp's own
    ``RuntimeError('Session is closed')``, and never a new session that would leak."""
    return ClientClosedError("the client is closed; no request is sent")


def check_key(api_key: str | None) -> None:
    """A key that cannot travel in a header is refused when the client is made, not at
    the first request (with aiohttp's raw ValueError)."""
    if api_key is not None and any(c in api_key for c in "\r\n\0"):
        raise ConfigurationError(
            "the API key contains a line break or NUL (a copy-paste error?): "
            "it cannot be sent in a header"
        )

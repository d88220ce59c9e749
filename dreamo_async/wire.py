"""The provider's JSON, both ways: one cattrs converter, tolerant of every variant.

Outgoing, a :class:`GenerationRequest` becomes the wrapped create body of API.md::

    {"model": "...", "input": [{"params": {...}}]}

Incoming, every documented variant parses (API.md, "The documentation is not
consistent"): an optional ``{"data": ..., "status": {...}}`` envelope, any status
word, ``error`` as an object or a string, image URLs at ``output[].content[].url``
or ``output[].url``, ``created_at`` in seconds, milliseconds or ISO 8601. Unknown
fields never break parsing; the whole task JSON is kept in ``raw``.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
from collections.abc import Mapping, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any, Final, TypeGuard

import cattrs
from cattrs.gen import make_dict_unstructure_fn, override

from ._fastpath import encode_head
from .errors import (
    APIError,
    AuthenticationError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    ResponseFormatError,
    ServerError,
)
from .models import _STATUS_WORDS, OutputImage, Task, TaskError, TaskStatus, Usage
from .request import GenerationRequest

__all__ = [
    "converter",
    "create_body_parts",
    "error_class_for_status",
    "parse_error_body",
    "parse_task",
    "request_params",
    "unwrap_envelope",
]

#: The one converter of the library.
converter: Final = cattrs.Converter()
converter.register_unstructure_hook(
    GenerationRequest,
    make_dict_unstructure_fn(
        GenerationRequest,
        converter,
        _cattrs_omit_if_default=True,
        images=override(omit=True),
        limits=override(omit=True),
        model=override(omit=True),
        ref_types=override(rename="ref_type_list"),
    ),
)


#: The converter's hook for requests, looked up once (``unstructure`` dispatches per call).
_UNSTRUCTURE_REQUEST: Final = converter.get_unstructure_hook(GenerationRequest)


def request_params(request: GenerationRequest) -> dict[str, Any]:
    """The ``params`` object of a create body, without the images (sent by the caller).

    Parameters left at ``None`` are omitted, so the service applies its defaults.
    """
    params: dict[str, Any] = _UNSTRUCTURE_REQUEST(request)
    return params


def create_body_parts(
    model: str,
    params: Mapping[str, Any],
    images_base64: Sequence[bytes | Sequence[bytes]] = (),
    image_urls: Sequence[str] = (),
) -> tuple[bytes, ...]:
    """A create request as byte strings whose concatenation is the JSON body.

    The base64 images (up to 5 x 6.3 MB) are spliced in as they are, not
    decoded to ``str`` and run through ``json.dumps``: base64 needs no JSON
    escaping; an image may come as the pieces of its base64 (sent one after
    the other). Only the small head (model and parameters) is serialised. The
    client joins the parts of a body up to ``client._JOIN_MAX_BYTES`` (256 KiB) into
    one buffer; a larger body's parts are sent one after the other
    (:class:`~dreamo_async._body.BodyParts`), so its image data is never copied
    into a body buffer.
    """
    body_params = {**params, "image_urls": list(image_urls)} if image_urls else params
    head = encode_head(model, body_params).encode()
    if not images_base64:
        return (head,)
    tail = b"}}]}"  # closes params, the input item, the input list, the body
    prefix = head[: -len(tail)]
    parts: list[bytes] = [
        prefix,
        b',"binary_data_base64":["' if body_params else b'"binary_data_base64":["',
    ]
    for i, image in enumerate(images_base64):
        if i:
            parts.append(b'","')
        if isinstance(image, bytes):
            parts.append(image)
        else:  # an image's base64 in pieces, sent as they are
            parts.extend(image)
    parts.append(b'"]' + tail)
    return tuple(parts)


# --------------------------------------------------------------------------- incoming


def unwrap_envelope(body: object) -> Mapping[str, Any]:
    """Return the task object, unwrapping ``{"data": ..., "status": {...}}`` if present.

    A non-200 ``status.code`` in an envelope is an error, mapped like an HTTP status.
    """
    if type(body) is dict and "data" not in body:
        return body  # the common case, without the (slow) ABC isinstance check
    if not isinstance(body, Mapping):
        raise ResponseFormatError(f"expected a JSON object, got {type(body).__name__}", status=None)
    envelope_status = body.get("status")
    if "data" in body and (isinstance(envelope_status, Mapping) or "id" not in body):
        if isinstance(envelope_status, Mapping):
            code = envelope_status.get("code")
            if code is not None and str(code) not in {"200", "201", "0"}:
                message = str(envelope_status.get("message") or "the service reported an error")
                status = _as_int(code)
                cls = error_class_for_status(status) if status is not None else APIError
                raise cls(message, status=status, code=str(code))
        data = body.get("data")
        if not isinstance(data, Mapping):
            raise ResponseFormatError(
                f"the envelope's data is {type(data).__name__}, expected an object"
            )
        return data
    return body


def parse_task(body: object) -> Task:
    """Parse a create or poll answer (enveloped or not) into a :class:`Task`."""
    data = unwrap_envelope(body)
    return _structure_task(data, Task)  # the converter's hook, minus its dispatch (hot path)


def _structure_task(data: Mapping[str, Any], _: type) -> Task:
    # Every answer runs this: the plain shapes (a str id, a known status word, absent
    # or plain-dict fields) are tested first, inline, and Task is called positionally
    # (its field order); other shapes go through the tolerant helpers, same results.
    get = data.get
    task_id = get("id")
    if type(task_id) is not str or not task_id:
        task_id = _odd_task_id(data)
    raw_status = get("status")
    status = _STATUS_WORDS.get(raw_status) if type(raw_status) is str else None
    if status is None:
        status = TaskStatus.from_wire(raw_status)
        if not isinstance(raw_status, str):
            raw_status = None
    metadata = get("metadata")
    if type(metadata) is not dict:
        metadata = metadata if metadata is not None and isinstance(metadata, Mapping) else {}
    model = get("model")
    progress = get("progress")
    created_at = get("created_at")
    output = get("output")
    usage = get("usage")
    return Task(
        task_id,
        status,
        raw_status,
        model if type(model) is str or isinstance(model, str) else None,
        None if progress is None else _parse_progress(progress),
        (
            _from_epoch(created_at)
            if type(created_at) is int or type(created_at) is float
            else _parse_time(created_at)
        ),
        _parse_output(output) if output else (),  # None, [] and other empties: no images
        None if usage is None else _parse_usage(usage),
        _parse_task_error(data) if status is _FAILED else None,
        metadata,
        data,
    )


def _odd_task_id(data: Mapping[str, Any]) -> str:
    """The id of an answer whose ``id`` is not a plain non-empty string (or is absent)."""
    task_id = data["id"] if "id" in data else data.get("task_id")
    if (
        not isinstance(task_id, _STR_INT)
        or isinstance(task_id, bool)
        or str(task_id) == ""  # an empty id, or a str subclass printing as nothing
    ):
        raise ResponseFormatError("the task answer has no id")
    return str(task_id)


#: Looked up once: the hot path compares against it per answer.
_FAILED: Final = TaskStatus.FAILED

converter.register_structure_hook(Task, _structure_task)


def _is_mapping(value: object) -> TypeGuard[Mapping[str, Any]]:
    """``isinstance(value, Mapping)``, fast for the plain dicts ``json.loads`` makes."""
    return type(value) is dict or isinstance(value, Mapping)


def _as_int(value: object) -> int | None:
    try:
        return int(str(value))
    except ValueError:
        return None


def _parse_progress(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, _NUMBER_OR_STR):
        return None
    try:
        number = float(value)
    except (ValueError, OverflowError):  # OverflowError: an int of hundreds of digits
        return None
    if not number >= 0:  # also rejects NaN
        return None
    if number > 1.0:  # a percentage
        number /= 100.0
    return min(number, 1.0)


# Tuples, not ``int | float``: a union in isinstance is built anew at every call.
_STR_INT: Final = (str, int)
_NUMBER: Final = (int, float)
_NUMBER_OR_STR: Final = (int, float, str)


@functools.lru_cache(maxsize=256)
def _from_epoch(value: float) -> dt.datetime | None:
    """Epoch seconds (or milliseconds) -> aware datetime; cached: every poll of a task
    repeats its ``created_at``."""
    try:
        seconds = value / 1000.0 if value > 1e11 else float(value)
        return dt.datetime.fromtimestamp(seconds, tz=dt.UTC)
    except (OverflowError, OSError, ValueError):  # huge ints, inf, NaN, year > 9999
        return None


def _parse_time(value: object) -> dt.datetime | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, _NUMBER):
        return _from_epoch(value)
    if isinstance(value, str):
        text = value.strip()
        if text.replace(".", "", 1).isdigit():
            return _parse_time(float(text))
        try:
            parsed = dt.datetime.fromisoformat(text)
        except ValueError:
            return None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)
    return None


def _parse_output(output: object) -> tuple[OutputImage, ...]:
    if output is None:
        return ()
    items: Sequence[object] = output if isinstance(output, list) else [output]
    images: list[OutputImage] = []
    for item in items:
        if isinstance(item, str):
            images.append(OutputImage(item))
            continue
        if not _is_mapping(item):
            continue
        content = item.get("content")
        if isinstance(content, list):
            for part in content:
                if _is_mapping(part):
                    url = part.get("url")
                    if isinstance(url, str):
                        kind = part.get("type")
                        images.append(
                            OutputImage(
                                url,
                                kind if type(kind) is str and kind else str(kind or "image"),
                                _job_of(part) or _job_of(item),  # the item's: a fallback
                            )
                        )
        url = item.get("url")
        if isinstance(url, str):
            images.append(OutputImage(url, str(item.get("type") or "image"), _job_of(item)))
    return tuple(images)


def _job_of(item: Mapping[str, Any]) -> str | None:
    """``jobId`` (or, when that is absent or null, ``job_id``) of an output item or part."""
    job = item.get("jobId")
    if job is None:
        job = item.get("job_id")
        if job is None:
            return None
    return job if type(job) is str else _str_or_none(job)


def _str_or_none(value: object) -> str | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return str(value)
    except (RecursionError, ValueError):  # a list nested 900 deep; an int too long to print
        return None


#: A cost of 10**15 USD or more is no cost the service could charge: dropped as unreadable.
_MAX_COST_DIGITS: Final = 14


def _parse_usage(usage: object) -> Usage | None:
    if not _is_mapping(usage):
        return None
    raw_cost = usage.get("cost")
    raw_discount = usage.get("discount")
    if type(raw_cost) in _CACHED_SCALARS and type(raw_discount) in _CACHED_SCALARS:
        # Hashable scalars: every task of a model answers with the same few prices.
        return _usage_of(raw_cost, raw_discount)
    return _read_usage(raw_cost, raw_discount)


#: Exact types whose values key the usage cache (no bool: True == 1 would share a key).
_CACHED_SCALARS: Final = frozenset({str, int, float, type(None)})


@functools.lru_cache(maxsize=64, typed=True)  # typed: 1 and 1.0 print differently
def _usage_of(raw_cost: object, raw_discount: object) -> Usage:
    """:func:`_read_usage`, cached (``Usage`` is immutable, so one instance is shared)."""
    return _read_usage(raw_cost, raw_discount)


def _read_usage(raw_cost: object, raw_discount: object) -> Usage:
    cost: Decimal | None = None
    if isinstance(raw_cost, _NUMBER_OR_STR) and not isinstance(raw_cost, bool):
        try:
            cost = Decimal(str(raw_cost).strip())
        except InvalidOperation:
            cost = None
        # NaN, infinity and absurd magnitudes (1e999999) would break sums of costs.
        if cost is not None and not (cost.is_finite() and cost.adjusted() <= _MAX_COST_DIGITS):
            cost = None
    discount: float | None = None
    if isinstance(raw_discount, _NUMBER) and not isinstance(raw_discount, bool):
        try:
            discount = float(raw_discount)
        except OverflowError:  # an int of hundreds of digits
            discount = None
    return Usage(cost=cost, discount=discount)


def _parse_task_error(data: Mapping[str, Any]) -> TaskError:
    error = data.get("error")
    if isinstance(error, Mapping):
        message = error.get("message", error.get("error_message", error.get("msg")))
        return TaskError(code=_str_or_none(error.get("code")), message=_str_or_none(message))
    if isinstance(error, str):
        return TaskError(code=_str_or_none(data.get("error_code")), message=error)
    message = data.get("error_message", data.get("message"))
    return TaskError(code=_str_or_none(data.get("error_code")), message=_str_or_none(message))


# --------------------------------------------------------------------------- errors

_STATUS_CLASSES: Final[Mapping[int, type[APIError]]] = {
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    429: RateLimitError,
}


def error_class_for_status(status: int) -> type[APIError]:
    """The exception class of an HTTP (or envelope) status."""
    if status >= 500:
        return ServerError
    return _STATUS_CLASSES.get(status, APIError)


def parse_error_body(
    body: bytes, content_type: str | None
) -> tuple[str | None, str | None, float | None]:
    """Read ``(message, code, retry_after)`` from an error answer's body, when it has them.

    The bodies are undocumented: JSON with ``error.message`` / ``error.error_message`` /
    ``message`` / ``error`` is read; anything else (an HTML page from a proxy, an empty
    body) yields ``(None, None, None)`` and the caller words the error from the status.
    """
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None, None, None
    if not isinstance(data, Mapping):
        return None, None, None
    error = data.get("error")
    message: object = None
    code: object = data.get("code")
    retry_after: object = data.get("retry_after")
    if isinstance(error, Mapping):
        message = error.get("message", error.get("error_message"))
        code = error.get("code", code)
        retry_after = error.get("retry_after", retry_after)
    elif isinstance(error, str):
        message = error
    if message is None:
        message = data.get("message", data.get("error_message"))
    status = data.get("status")
    if message is None and isinstance(status, Mapping):
        message = status.get("message")
        code = code if code is not None else status.get("code")
    hint: float | None = None
    if isinstance(retry_after, int | float | str) and not isinstance(retry_after, bool):
        try:
            hint = float(retry_after)
        except (ValueError, OverflowError):
            hint = None
        if hint is not None and not hint >= 0:
            hint = None
    return _str_or_none(message), _str_or_none(code), hint

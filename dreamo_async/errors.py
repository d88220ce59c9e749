"""Every exception and warning the library raises, in one place.

The hierarchy::

    DreamOError
    ├── InvalidRequestError (ValueError)     client-side checks, before anything is sent
    │   ├── ImageError                       an input image is unusable (format, size, header...)
    │   └── JobsFileError                    a batch jobs file has problems (``file:line: ...``)
    ├── ConfigurationError                   the client is set up wrong (no API key, bad URL)
    ├── ClientClosedError (RuntimeError)     the client was used after it was closed
    ├── APIError                             the service answered with an error
    │   ├── AuthenticationError              401: key missing or invalid
    │   ├── PermissionDeniedError            403: insufficient balance or permission denied
    │   ├── NotFoundError                    404: unknown task id
    │   ├── RateLimitError                   429: rate limit exceeded (``retry_after``)
    │   ├── ServerError                      5xx
    │   └── ResponseFormatError              the answer is not JSON of a known shape
    ├── APIConnectionError (ConnectionError) the service could not be reached
    ├── TaskFailedError                      the task ended as ``failed`` (provider error code)
    ├── TaskTimeoutError (TimeoutError)      the deadline passed; resume with ``wait(task_id)``
    ├── CreateOutcomeUnknownError            a create request may have made a task: never retried
    ├── BudgetExceededError                  ``max_spend`` leaves no room for the task: nothing sent
    ├── DownloadError                        a result image could not be saved (cap, not an image)
    ├── JournalError                         a batch journal is locked by another run, or stale
    └── LimitsBackendError                   a shared limits backend (Redis) is unavailable

    DreamOWarning (UserWarning)              advisory checks (long prompt, extreme aspect ratio)

Every error a job raises also says where the job's money stands (:class:`MoneyState`):
``money_state``, ``task_id`` once a task exists, ``request_id`` once a create was sent, and
``unknown_task_possible`` when a paid task may exist that the error cannot name. Callers,
``generate_many``, the batch journal and the CLI decide what to retry, resume or report from
these fields, never from the exception's class.

Errors inherit the standard type they behave like, so ``except ValueError`` and
``except TimeoutError`` keep working in code that knows nothing of this library.
Exceptions of aiohttp and other dependencies never reach users: the transport maps
them and chains the original as ``__cause__``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from typing import Any, Final

__all__ = [
    "PROVIDER_ERROR_CODES",
    "APIConnectionError",
    "APIError",
    "AuthenticationError",
    "BudgetExceededError",
    "ClientClosedError",
    "ConfigurationError",
    "CreateOutcomeUnknownError",
    "DownloadError",
    "DreamOError",
    "DreamOWarning",
    "ImageError",
    "InvalidRequestError",
    "JobsFileError",
    "JournalError",
    "LimitsBackendError",
    "MoneyState",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "ResponseFormatError",
    "ServerError",
    "TaskFailedError",
    "TaskTimeoutError",
]

#: The error codes documented for the DreamO models (the docs' "Errors" page), code -> meaning.
PROVIDER_ERROR_CODES: Final[Mapping[str, str]] = {
    "003013001": "missing prompt",
    "003013002": "missing image",
    "003013003": "invalid prompt length",
    "003013004": "invalid parameter",
    "003013095": "internal generation error",
    "003013096": "result parsing error",
    "003013097": "HTTP error response (upstream)",
    "003013098": "status check error",
    "003013099": "service unavailable",
}


class DreamOWarning(UserWarning):
    """An input the service may accept but handle poorly (long prompt, extreme aspect)."""


class MoneyState(enum.Enum):
    """Where a job stands with the service's billing: what may be retried, what must not.

    ``NOT_SENT``: nothing reached the service (checks, slot wait, a documented refusal,
    a connection never made, 429); retry freely. ``SENDING``: the create body may be on
    the wire. ``OUTCOME_UNKNOWN``: the body may have reached the service and the answer
    was lost or unreadable; never re-send, report ``request_id``. ``CREATED``: a task
    exists (``task_id``); poll or ``wait`` it, never create again. ``COMPLETED`` and
    ``FAILED``: the service said so.
    """

    NOT_SENT = "not_sent"
    SENDING = "sending"
    OUTCOME_UNKNOWN = "outcome_unknown"
    CREATED = "created"
    COMPLETED = "completed"
    FAILED = "failed"


class DreamOError(Exception):
    """Base class of every error this library raises.

    ``task_id`` names the task the error is about whenever one is known (a poll
    that failed, a deadline, a failed task), so the caller can resume with
    ``client.wait(err.task_id)`` or report it; ``None`` before a task exists.
    ``request_id`` is the ``X-Request-Id`` of the create once one was sent.
    ``money_state`` is the job's :class:`MoneyState` when the error was raised.
    """

    task_id: str | None = None
    request_id: str | None = None
    money_state: MoneyState = MoneyState.NOT_SENT

    @property
    def unknown_task_possible(self) -> bool:
        """A paid task may exist that this error does not name: report it, never re-send."""
        return self.task_id is None and self.money_state in _MAYBE_CREATED

    @property
    def nothing_sent(self) -> bool:
        """Nothing reached the service: the job may be sent again without paying twice."""
        return self.task_id is None and self.money_state is MoneyState.NOT_SENT


_MAYBE_CREATED: Final = frozenset({MoneyState.SENDING, MoneyState.OUTCOME_UNKNOWN})


class InvalidRequestError(DreamOError, ValueError):
    """A parameter breaks a documented limit; raised before any request is sent.

    ``parameter`` names what was wrong (``"ddim_steps"``, ``"images[2]"``...).
    """

    def __init__(self, message: str, *, parameter: str | None = None) -> None:
        super().__init__(message)
        self.parameter = parameter


class ImageError(InvalidRequestError):
    """An input image is unusable: unreadable, wrong format, too large, corrupt header.

    ``index`` is the image's position in ``images`` and ``source`` a short,
    printable description of where it came from (file name, ``<bytes>``, URL).
    """

    def __init__(
        self, message: str, *, index: int | None = None, source: str | None = None
    ) -> None:
        parameter = f"images[{index}]" if index is not None else "images"
        super().__init__(message, parameter=parameter)
        self.index = index
        self.source = source


class ConfigurationError(DreamOError):
    """The client is configured in a way that cannot work (no API key, bad base URL)."""


class ClientClosedError(DreamOError, RuntimeError):
    """The client was used after ``aclose()`` (or after its ``async with`` block)."""


class APIError(DreamOError):
    """The service answered with an error.

    ``status`` is the HTTP status (or the envelope's ``status.code``), ``code`` the
    provider's error code as a string when the body carried one, ``message`` its text.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.request_id = request_id

    def __str__(self) -> str:
        parts = [self.message]
        if self.status is not None:
            parts.append(f"HTTP {self.status}")
        if self.code is not None:
            parts.append(f"code {self.code}")
        if self.request_id is not None:
            parts.append(f"request id {self.request_id}")
        if self.task_id is not None and self.task_id not in self.message:
            parts.append(f"task {self.task_id}")
        return " | ".join(parts)


class AuthenticationError(APIError):
    """401: the API key is missing or invalid."""


class PermissionDeniedError(APIError):
    """403: insufficient balance or permission denied."""


class NotFoundError(APIError):
    """404: the task id (or path) is unknown to the service."""


class RateLimitError(APIError):
    """429: rate limit exceeded. ``retry_after`` is the server's hint in seconds, if any."""

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        status: int | None = 429,
        code: str | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message, status=status, code=code, request_id=request_id)
        self.retry_after = retry_after


class ServerError(APIError):
    """5xx: the service failed to handle the request."""


class ResponseFormatError(APIError):
    """The answer was not JSON, or JSON of a shape no documented variant has."""


class APIConnectionError(DreamOError, ConnectionError):
    """The service could not be reached (DNS, refused, reset, timed out) after retries."""


class TaskFailedError(DreamOError):
    """The task ended in a failure status. ``code`` is the provider's error code."""

    task_id: str
    money_state = MoneyState.FAILED

    def __init__(self, task_id: str, code: str | None, message: str | None) -> None:
        self.task_id = task_id
        self.code = code
        self.message = message
        meaning = PROVIDER_ERROR_CODES.get(code or "")
        text = f"task {task_id} failed"
        if code:
            text += f" with code {code}"
            if meaning:
                text += f" ({meaning})"
        if message:
            text += f": {message}"
        super().__init__(text)

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.task_id, self.code, self.message), self.__dict__)


class TaskTimeoutError(DreamOError, TimeoutError):
    """The job's deadline passed before the task finished.

    The task keeps running at the service: ``await client.wait(err.task_id)`` resumes.
    """

    task_id: str
    money_state = MoneyState.CREATED

    def __init__(self, task_id: str, timeout: float, last_status: str | None = None) -> None:
        self.task_id = task_id
        self.timeout = timeout
        self.last_status = last_status
        status = f" (last status {last_status})" if last_status else ""
        super().__init__(
            f"task {task_id} did not finish within {timeout:g} s{status}; "
            f"it may still complete: resume with client.wait({task_id!r})"
        )

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.task_id, self.timeout, self.last_status), self.__dict__)


class CreateOutcomeUnknownError(DreamOError):
    """The create request may or may not have made a (paid) task.

    Raised when the request body left this machine and the answer was lost or was a
    5xx. The library never re-sends such a request: retrying could pay twice. The
    ``request_id`` (sent as ``X-Request-Id``) helps the provider's support find it.
    """

    money_state = MoneyState.OUTCOME_UNKNOWN

    def __init__(self, message: str, *, request_id: str | None = None) -> None:
        self.request_id = request_id
        rid = f" (X-Request-Id {request_id})" if request_id else ""
        super().__init__(
            f"{message}{rid}; a task may have been created, so the request was not re-sent"
        )

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_outcome_unknown, (self.args[0], self.request_id), self.__dict__)


def _rebuild_outcome_unknown(text: str, request_id: str | None) -> CreateOutcomeUnknownError:
    err = CreateOutcomeUnknownError.__new__(CreateOutcomeUnknownError)
    Exception.__init__(err, text)
    err.request_id = request_id
    return err


class BudgetExceededError(DreamOError):
    """``max_spend`` leaves no room for this task's estimate: the create was not sent.

    ``cap``, ``spent``, ``reserved`` and ``estimate`` (``None`` for a probe) are the
    figures of the decision (USD, ``Decimal``). Nothing reached the service.
    """

    def __init__(self, *, cap: Any, spent: Any, reserved: Any, estimate: Any) -> None:
        self.cap = cap
        self.spent = spent
        self.reserved = reserved
        self.estimate = estimate
        if estimate is None:
            why = f"spent ${spent} leaves no room for another task"
        else:
            why = f"spent ${spent} + reserved ${reserved} + this task's estimate ${estimate}"
            why += " would go over it"
        super().__init__(f"max_spend ${cap} reached: {why}; nothing was sent")

    def __reduce__(self) -> tuple[object, ...]:
        figures = (self.cap, self.spent, self.reserved, self.estimate)
        return (_rebuild_budget, figures, self.__dict__)


def _rebuild_budget(cap: Any, spent: Any, reserved: Any, estimate: Any) -> BudgetExceededError:
    return BudgetExceededError(cap=cap, spent=spent, reserved=reserved, estimate=estimate)


class DownloadError(DreamOError):
    """A result image could not be saved: over the size cap, not an image, unsafe name.

    HTTP failures of the download itself keep their own classes (``NotFoundError``
    for an expired URL, ``APIConnectionError``...); this one is for what the
    client refuses to write.
    """


class JobsFileError(InvalidRequestError):
    """A batch jobs file has problems; ``problems`` lists them as ``file:line: message``.

    Raised before anything is sent, with every problem of the file, not just the first.
    """

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        more = "" if len(self.problems) <= 1 else f" (and {len(self.problems) - 1} more)"
        super().__init__(
            f"{self.problems[0] if self.problems else 'no problems'}{more}", parameter="jobs"
        )

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.problems,), self.__dict__)


class JournalError(DreamOError):
    """A batch journal cannot be used: locked by another run, or written for other jobs."""


class LimitsBackendError(DreamOError):
    """The shared limits backend (for example Redis) cannot be reached or answered wrongly."""


#: Errors after which the service cannot be used at all (the key is refused, the
#: service is unreachable): a batch stops, and the ``dreamo`` command exits with 3.
SERVICE_ERRORS: Final = (AuthenticationError, PermissionDeniedError, APIConnectionError)

"""How a command ends: one error-to-exit-code mapping, the error display (text or
JSON), Ctrl-C and SIGTERM, and warnings printed as compiler-style lines."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import warnings
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, Final, NoReturn, TextIO

import click
from rich.console import Console
from rich.markup import escape

from ..errors import (
    SERVICE_ERRORS,
    ConfigurationError,
    DreamOError,
    InvalidRequestError,
    JournalError,
)

__all__ = [
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_SERVICE",
    "EXIT_TERMINATED",
    "EXIT_USAGE",
    "CliExit",
    "error_json",
    "exit_code_for",
    "fail",
    "print_json",
    "run",
    "run_main",
    "user_message",
]

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
EXIT_SERVICE: Final = 3
EXIT_INTERRUPTED: Final = 130
EXIT_TERMINATED: Final = 128 + signal.SIGTERM  # 143, as shells report a SIGTERM death

JOURNAL_HINT: Final = "every job state is in the journal; run the same command again to resume"

#: What the library tells Python callers to do, and what a CLI user types instead.
_LIBRARY_ADVICE: Final = (("DreamOClient(allow_private_urls=True)", "--allow-private-urls"),)


class CliExit(Exception):
    """Leave a command with ``code`` after showing ``message`` (and ``error``, in JSON)."""

    def __init__(
        self, code: int, message: str | None = None, *, error: BaseException | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.error = error


def exit_code_for(exc: BaseException) -> int:
    """The one mapping from an error to the exit code: read from what was sent.

    2 (usage/input) only when nothing was sent; 3 when the service cannot be used
    (refused key, unreachable); 1 for everything else (a job failed, or its outcome is
    unknown).
    """
    if isinstance(exc, CliExit):
        return exc.code
    if isinstance(exc, SERVICE_ERRORS):
        return EXIT_SERVICE
    if isinstance(exc, JournalError):
        # Refused up front (locked, unopenable, written for other jobs): nothing was
        # sent. Failed once jobs ran (the batch's private subclass): a failed run.
        return EXIT_USAGE if type(exc) is JournalError else EXIT_FAILED
    if isinstance(exc, InvalidRequestError | ConfigurationError) and exc.nothing_sent:
        return EXIT_USAGE
    return EXIT_FAILED


def user_message(exc: BaseException | str) -> str:
    """An error's text, with the library's advice to Python callers (``pass
    DreamOClient(...)``) turned into the option a CLI user types."""
    text = str(exc)
    for library, option in _LIBRARY_ADVICE:
        text = text.replace(f"pass {library}", f"pass {option}").replace(library, option)
    return text


def fail(exc: BaseException, extra: str = "") -> NoReturn:
    """Leave the command for ``exc``, exit code from :func:`exit_code_for`."""
    message = user_message(exc) + (f"\n{extra}" if extra else "")
    raise CliExit(exit_code_for(exc), message, error=exc) from None


def print_json(data: Any, stream: TextIO | None = None) -> None:
    out = stream or sys.stdout
    out.write(json.dumps(data, ensure_ascii=False) + "\n")
    out.flush()


def error_json(code: int, message: str, error: BaseException | None = None) -> dict[str, Any]:
    """The JSON object printed on stdout under ``--json`` when a command fails."""
    body: dict[str, Any] = {
        "type": type(error).__name__ if error is not None else "UsageError",
        "message": message,
    }
    if isinstance(error, DreamOError):
        body["money_state"] = error.money_state.value
        body["task_id"] = error.task_id
        body["request_id"] = error.request_id
    return {"ok": False, "exit_code": code, "error": body}


def show_error(
    code: int, message: str, *, as_json: bool, error: BaseException | None = None
) -> None:
    """The error on stderr for people; under ``--json`` also as an object on stdout."""
    if message:
        Console(stderr=True, highlight=False).print(
            f"[red]error:[/red] {escape(message)}", soft_wrap=True
        )
    if as_json:
        print_json(error_json(code, message, error))


def interrupted(hint: str, *, code: int = EXIT_INTERRUPTED, as_json: bool = False) -> NoReturn:
    what = "terminated" if code == EXIT_TERMINATED else "interrupted"
    sys.stderr.write(f"\n{what}: {hint}\n")
    if as_json:
        print_json({"ok": False, "exit_code": code, "error": {"type": what, "message": hint}})
    raise SystemExit(code)


def run(
    coro_fn: Callable[[], Coroutine[Any, Any, int]],
    hint: Callable[[], str] = lambda: JOURNAL_HINT,
    *,
    as_json: bool = False,
) -> NoReturn:
    """Run a command's coroutine; map errors, Ctrl-C and SIGTERM to exit codes.

    SIGTERM cancels the command as Ctrl-C does (the batch journal records every
    state on the way out), then exits 143.
    """
    terminated = False

    async def guarded() -> int:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()

        def on_sigterm() -> None:
            nonlocal terminated
            terminated = True
            task.cancel()

        loop.add_signal_handler(signal.SIGTERM, on_sigterm)
        try:
            return await coro_fn()
        finally:
            loop.remove_signal_handler(signal.SIGTERM)

    with warnings.catch_warnings():
        warnings.showwarning = show_warning
        try:
            code = asyncio.run(guarded())
        except KeyboardInterrupt:
            interrupted(hint(), as_json=as_json)
        except asyncio.CancelledError:
            if not terminated:
                raise
            interrupted(hint(), code=EXIT_TERMINATED, as_json=as_json)
        except CliExit as exc:
            show_error(exc.code, exc.message or "", as_json=as_json, error=exc.error)
            raise SystemExit(exc.code) from None
    raise SystemExit(code)


_LOG_LEVELS: Final = ("debug", "info", "warning", "error")


def configure_logging(value: str | None) -> None:
    """``DREAMO_LOG=debug|info|warning|error``: the library's log lines on stderr.

    A handler is added only when the ``dreamo_async`` logger has none (the library, or
    the user's own ``logging`` setup, may have configured it already)."""
    if not value:
        return
    level = value.strip().lower()
    if level not in _LOG_LEVELS:
        emit_warning(f"DREAMO_LOG={value!r} is not one of {', '.join(_LOG_LEVELS)}; ignored")
        return
    logger = logging.getLogger("dreamo_async")
    logger.setLevel(level.upper())
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)


def run_main(group: click.Group) -> None:
    """Run the command line; under ``--json`` a usage error is also a JSON object."""
    args = sys.argv[1:]
    as_json = "--json" in args
    configure_logging(os.environ.get("DREAMO_LOG"))
    try:
        with warnings.catch_warnings():
            warnings.showwarning = show_warning
            group.main(args=args, prog_name="dreamo", standalone_mode=False)
    except click.ClickException as exc:
        exc.show()
        if as_json:
            print_json(error_json(exc.exit_code, exc.format_message()))
        raise SystemExit(exc.exit_code) from None
    except click.Abort:
        interrupted(JOURNAL_HINT, as_json=as_json)


# -- warnings -----------------------------------------------------------------------------

_PACKAGE: Final = Path(__file__).resolve().parent.parent
_PRINTED: set[str] = set()


def _is_users_file(filename: str) -> bool:
    """A file a user wrote (a jobs file, their script), not ours, not Python's."""
    if not filename or filename.startswith("<"):
        return False
    path = Path(filename).resolve()
    roots = {Path(p).resolve() for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    return _PACKAGE not in path.parents and not any(root in path.parents for root in roots)


def warning_line(message: str, filename: str | None = None, lineno: int | None = None) -> str:
    """``file:line: warning: message``, or ``warning: message`` without a file."""
    if filename and lineno:
        return f"{filename}:{lineno}: warning: {message}"
    return f"warning: {message}"


def emit_warning(message: str, filename: str | None = None, lineno: int | None = None) -> None:
    """Print a warning line once (the same text from the run after a check is not repeated)."""
    _PRINTED.add(message)
    sys.stderr.write(user_message(warning_line(message, filename, lineno)) + "\n")


def show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """``warnings.showwarning`` of the CLI: one line, never Python's source excerpt."""
    text = str(message)
    if text in _PRINTED:
        return
    if _is_users_file(filename):
        emit_warning(text, os.path.relpath(filename) if filename else None, lineno)
    else:
        emit_warning(text)

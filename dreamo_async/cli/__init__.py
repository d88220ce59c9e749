"""The ``dreamo`` command: one generation, resumable bulk runs, task lookups, a demo.

Built on two well-kept libraries rather than hand-rolled code, both in the
``cli`` extra (library users need neither; without them the command prints an
install hint, as httpx's ``httpx`` command does):

* **click** parses and validates arguments (types, ranges, choices, files) with
  usage errors on exit code 2 and help text for free, and ships ``CliRunner``
  for tests;
* **rich** draws the progress bar and the summary table, and falls back to
  plain text by itself when the output is not a terminal (a pipe, a CI log).

Exit codes: 0 every job done, 1 some jobs failed (or their outcome is
unknown), 2 usage or input error (nothing was sent), 3 the service is
unreachable or refused the key, 130 interrupted (Ctrl-C), 143 terminated
(SIGTERM); after either the journal keeps every state, so re-running resumes.
Under ``--json`` a failure prints a JSON error object on stdout.

The API key comes from ``DREAMO_API_KEY`` / ``VTRIX_API_KEY`` or from
``--api-key-file``; there is deliberately no ``--api-key`` option, which would
land in shell history and in ``ps`` output.

Layout: ``app`` (the group), ``tasks`` (generate, status, wait), ``batch_run``,
``demo``, ``options`` (shared options, the client factory), ``display``,
``output`` (JSON records), ``running`` (exit codes, errors, signals, warnings).
"""

from __future__ import annotations

import sys
from typing import Final

__all__ = ["main"]

_INSTALL_HINT: Final = "the dreamo command needs the 'cli' extra: pip install 'dreamo_async[cli]'\n"

try:
    from .app import cli
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    if exc.name not in ("click", "rich") and not (exc.name or "").startswith(("click.", "rich.")):
        raise

    def main() -> None:
        """Console-script entry point, without the ``cli`` extra: the install hint."""
        sys.stderr.write(_INSTALL_HINT)
        raise SystemExit(2)

else:
    __all__ += ["cli"]

    def main() -> None:
        """Console-script entry point."""
        from .running import run_main

        run_main(cli)

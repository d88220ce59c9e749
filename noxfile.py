"""The test suite on every CPython that pyproject.toml claims (run by ``make unit``).

One session per version, run in turn; within a session pytest-xdist runs the suite
on two workers (most of its time is waiting on timers, not CPU); ``-- -n 0`` runs it
in one process. Interpreters are found by nox on PATH, then among pyenv's installs. A missing one
fails the run in CI (nox does so when ``CI`` is set) and is skipped, with a hint,
elsewhere. ruff and mypy run once, from the Makefile, not here.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nox

#: Keep in step with the classifiers in pyproject.toml and the README.
PYTHONS = ["3.11", "3.12", "3.13"]

nox.options.sessions = ["tests"]
nox.options.reuse_venv = "yes"  # `pip install -e` still runs: a changed pyproject is seen
nox.options.download_python = "never"  # registries only: no interpreter downloads
# uv installs a session in seconds where pip takes most of a minute; virtualenv without it.
nox.options.default_venv_backend = "uv|virtualenv"


def _add_pyenv_installs_to_path() -> None:
    """pyenv's shims run only the versions made active; its other installs come after PATH."""
    root = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv")
    installs = sorted((str(p) for p in root.glob("versions/*/bin")), reverse=True)
    os.environ["PATH"] = os.pathsep.join([os.environ.get("PATH", ""), *installs])


_add_pyenv_installs_to_path()
for _version in PYTHONS:
    if shutil.which(f"python{_version}") is None and "CI" not in os.environ:
        print(
            f"note: no python{_version} on PATH nor under pyenv: its tests are skipped; "
            f"install it with: pyenv install {_version}"
        )


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """The whole pytest suite (``nox -s tests -- ARGS`` passes ARGS to pytest)."""
    session.install("--quiet", "-e", ".[cli,dev]")
    session.run(
        "python",
        "-c",
        "import platform, sys; "
        "print(f'== {platform.python_implementation()} {platform.python_version()} "
        "({sys.executable})')",
        silent=False,
    )
    session.run("pytest", "--numprocesses=2", *session.posargs)

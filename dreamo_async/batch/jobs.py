"""The jobs file of a batch: read and checked whole, every problem reported, before anything
is sent.

Each line is validated into a :class:`~dreamo_async.GenerationRequest` once; the run sends
that request (it is not built again from the line).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, Literal

import attrs

from ..errors import InvalidRequestError, JobsFileError
from ..images import ImageSource, check_local_image, classify_images, path_or_url
from ..limits import DEFAULT_LIMITS, Limits
from ..request import GenerationRequest

__all__ = ["JOB_KEYS", "BatchJob", "JobState", "load_jobs"]

JobState = Literal["queued", "sending", "created", "completed", "failed", "unknown"]
#: The keys a job line may have: the keywords of ``generate`` (``GenerationRequest``'s
#: fields, so a new parameter is accepted here the day it is added there), but not
#: ``limits``, which is the client's.
JOB_KEYS: Final = frozenset(field.name for field in attrs.fields(GenerationRequest)) - {"limits"}


@attrs.frozen
class BatchJob:
    """One job of a batch: its position, where it came from, and its parameters.

    ``params`` are the keywords of ``generate`` as JSON values, image paths
    already absolute; ``digest`` fingerprints them so that a journal is never
    resumed against a changed job. ``request`` is the request :func:`load_jobs`
    checked, sent as it is (``None``: built from ``params`` when the job runs).
    """

    index: int
    params: Mapping[str, Any]
    line: int = 0
    source: str = "<jobs>"
    request: GenerationRequest | None = attrs.field(default=None, eq=False, repr=False)

    @property
    def digest(self) -> str:
        canonical = json.dumps(
            self.params, sort_keys=True, separators=(",", ":"), default=params_json
        )
        return hashlib.sha256(canonical.encode()).hexdigest()[:32]

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


def load_jobs(path: str | os.PathLike[str], *, limits: Limits = DEFAULT_LIMITS) -> list[BatchJob]:
    """Read and check a whole JSON-lines jobs file before anything is sent.

    One JSON object per line (UTF-8, a byte order mark allowed), with the keywords of
    ``generate``; blank lines are skipped; relative image paths resolve against the
    file's folder. Every
    problem is collected (malformed JSON, unknown key, missing or unusable
    image, out-of-range value) and raised together as :class:`JobsFileError`,
    each as ``file:line: message``.
    """
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8-sig")  # -sig: a BOM (Windows editors) is dropped
    except (OSError, UnicodeDecodeError) as exc:
        raise JobsFileError([f"{file}: cannot read the jobs file: {exc}"]) from None
    base = file.resolve().parent
    jobs: list[BatchJob] = []
    problems: list[str] = []
    #: Image files already read and found fine (a file used by many jobs is read once).
    checked: set[str] = set()
    # Lines end at "\n" only: str.splitlines() also splits at characters a JSON string may
    # hold as they are (U+2028, form feed...), which would shift every line number after.
    for number, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        where = f"{file}:{number}"
        try:
            params, request = _check_line(raw, base, limits, checked)
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
            continue
        job = BatchJob(len(jobs), params, line=number, source=str(file), request=request)
        jobs.append(job)
    if problems:
        raise JobsFileError(problems)
    if not jobs:
        raise JobsFileError([f"{file}: no jobs (one JSON object per line expected)"])
    return jobs


def _check_line(
    raw: str, base: Path, limits: Limits, checked: set[str]
) -> tuple[dict[str, Any], GenerationRequest]:
    """One line's parameters (as JSON values, for the journal) and its checked request."""
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:  # its "line 1" is the line's own: say the column
        raise ValueError(f"not valid JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    if unknown := sorted(set(data) - JOB_KEYS):
        raise ValueError(
            f"unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(JOB_KEYS))}"
        )
    for key in ("prompt", "images"):
        if key not in data:
            raise ValueError(f"missing {key!r}")
    for key, value in data.items():
        if key != "images":  # local paths are never sent; URLs are checked below
            _check_sendable(key, value)
    images = data["images"]
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise ValueError("'images' must be a list of paths or URLs (strings)")
    try:
        # The file's own paths are paths: a str is a URL or a data URI to the library.
        sources = classify_images([path_or_url(image) for image in images])
    except InvalidRequestError as exc:  # ftp://, file://, empty paths, ...
        raise ValueError(str(exc)) from None
    for n, source in enumerate(sources, start=1):
        if source.kind != "path":
            _check_sendable(f"image {n}", source.value)
    sources = tuple(_resolve(source, base) for source in sources)
    params = {**data, "images": [str(source.value) for source in sources]}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # advisories are for the run, not for input errors
            request = GenerationRequest(limits=limits, **{**params, "images": sources})
    except (InvalidRequestError, TypeError) as exc:
        raise ValueError(str(exc)) from None
    for n, (given, source) in enumerate(zip(images, sources, strict=True), start=1):
        # Only files that passed are remembered: a failure is rare, and its message
        # names the image's position in this line, which differs between lines.
        if source.kind == "path" and (path := str(source.value)) not in checked:
            if not Path(given).expanduser().is_absolute() and not os.path.lexists(path):
                raise ValueError(
                    f"image {n} ({given}) does not exist: relative paths are resolved "
                    f"against the jobs file's folder, {base}"
                )
            _check_image_file(source, limits)
            checked.add(path)
    return params, request


def _check_sendable(key: str, value: object) -> None:
    """Refuse text that cannot be encoded for the wire (a lone surrogate such as
    ``"\\ud800"`` is valid JSON but not UTF-8), before anything is sent."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            char = value[exc.start]
            raise ValueError(
                f"{key!r} cannot be sent: it holds a lone surrogate {char!r} at position "
                f"{exc.start} (not valid Unicode text)"
            ) from None
    elif isinstance(value, list):
        for n, item in enumerate(value):
            _check_sendable(f"{key}[{n}]", item)
    elif isinstance(value, dict):
        for name, item in value.items():
            _check_sendable(f"{key}.{name}", item)


def _resolve(source: ImageSource, base: Path) -> ImageSource:
    """A path source made absolute against the jobs file's folder; any other source as is."""
    if source.kind != "path":
        return source
    path = Path(source.value).expanduser()  # type: ignore[arg-type]  # a path source's value
    return attrs.evolve(source, value=path if path.is_absolute() else base / path)


def _check_image_file(source: ImageSource, limits: Limits) -> None:
    """Read and check a local image the way a run will; a problem is a ``ValueError``
    with the library's own message."""
    try:
        check_local_image(source, limits)
    except InvalidRequestError as exc:
        raise ValueError(str(exc)) from None


def params_json(value: object) -> str:
    """A job's parameter as the journal writes it: a local path as its text."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)  # type: ignore[no-any-return]
    raise TypeError(f"a job parameter of type {type(value).__name__} cannot be journalled")

"""Where the service is: the base URL and the two paths, and the poll URL of a task id."""

from __future__ import annotations

from collections.abc import Callable
from typing import Final
from urllib.parse import quote

import attrs
from yarl import URL

from .errors import ConfigurationError

__all__ = ["DEFAULT_BASE_URL", "Endpoints", "task_url_maker"]

#: The provider's base URL (API.md).
DEFAULT_BASE_URL: Final = "https://cloud.vtrix.ai"


@attrs.frozen(kw_only=True)
class Endpoints:
    """Where the two calls go. Both paths are configuration (a proxy may move them)."""

    base_url: str = DEFAULT_BASE_URL
    create_path: str = "/model/v1/generation"
    task_path: str = "/model/v1/generation/task/{id}"

    def __attrs_post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ConfigurationError(
                f"base_url must be an http:// or https:// URL; got {self.base_url!r}"
            )

    @property
    def create_url(self) -> str:
        return self.base_url.rstrip("/") + self.create_path


#: Characters left as they are in a URL path (RFC 3986 pchar, plus "/" and "%").
_PATH_SAFE: Final = "/%:@!$&'()*+,;=-._~"


def task_url_maker(endpoints: Endpoints) -> Callable[[str], URL | str]:
    """``task_id -> URL`` of its poll. Parsing a URL string costs ~3.6 µs, and every
    poll URL is new; with a ``{id}`` template the URL is built from parts already
    parsed (~1 µs), the id percent-encoded. Other templates are formatted as text."""
    base = endpoints.base_url.rstrip("/")
    head, sep, tail = endpoints.task_path.partition("{id}")
    if not sep or any(c in head + tail for c in "{}?#"):  # a format spec, a query...
        return lambda task_id: base + endpoints.task_path.format(id=quote(task_id, safe=""))
    origin = URL(base)
    prefix = origin.raw_path.rstrip("/") + quote(head, safe=_PATH_SAFE)
    suffix = quote(tail, safe=_PATH_SAFE)

    def task_url(task_id: str) -> URL:
        quoted = task_id if task_id.isalnum() and task_id.isascii() else quote(task_id, safe="")
        return origin.with_path(prefix + quoted + suffix, encoded=True)

    return task_url

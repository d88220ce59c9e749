"""Where the client may connect, and keeping the API key out of reprs.

When a request mixes local images with URLs, the client downloads the URLs
itself. Those URLs come from users (a web app's visitors), so by default the
client refuses to connect to private, loopback, link-local and other
non-public addresses: it must not become a proxy into the network it runs in
(cloud metadata at 169.254.169.254, an admin port on 127.0.0.1...).

The check runs where it cannot be dodged: in the socket factory of the
connector, on the address actually being connected to, after DNS. A host
name that resolves to 10.0.0.5, a DNS answer that changes between a check and
the connection (rebinding), a redirect to ``http://127.0.0.1/``, an IP
literal in any spelling and an IPv4-mapped IPv6 address all end there.
``DreamOClient(allow_private_urls=True)`` turns it off (tests on 127.0.0.1, an
intranet deployment).
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from typing import Any, Final
from urllib.parse import urlsplit

from .errors import InvalidRequestError

__all__ = [
    "BlockedAddressError",
    "check_url",
    "display_url",
    "guarded_socket_factory",
    "secret_header",
]

#: One message for every refusal, so that when all of a host's addresses are refused
#: the connection library re-raises our error instead of a merged ``OSError``.
_REFUSED: Final = "connection refused by dreamo_async: not a public address"


class BlockedAddressError(OSError):
    """A connection to a non-public address was refused. ``reason`` says which and why."""

    def __init__(self, reason: str) -> None:
        super().__init__(errno.EACCES, _REFUSED)
        self.reason = reason


def address_problem(host: str) -> str | None:
    """Why ``host`` (an IP address) must not be connected to, or ``None`` if it is public."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return f"{host!r} is not an IP address"
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped or address.sixtofour
        if mapped is not None:
            problem = address_problem(str(mapped))
            return f"{address} embeds {problem}" if problem else None
    for kind in ("loopback", "link_local", "unspecified", "multicast", "reserved", "private"):
        if getattr(address, f"is_{kind}"):
            return f"{address} is a {kind.replace('_', '-')} address"
    if not address.is_global:
        return f"{address} is not a globally reachable address"
    return None


def display_url(url: str, *, scheme: bool = True) -> str:
    """A URL fit for messages, logs and journals: no user info, no query, no fragment.

    Signed URLs carry their token in the query and ``https://user:pw@host/`` its
    password before the host: neither may reach an error text that ends up in a
    journal or ``results.jsonl``.
    """
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"  # an IPv6 literal
        if parts.port is not None:
            host += f":{parts.port}"
    except ValueError:  # a malformed port or bracketed host
        return "<URL>"
    shown = host + parts.path
    return f"{parts.scheme}://{shown}" if scheme and parts.scheme else shown


def guarded_socket_factory(addr_info: tuple[Any, ...]) -> socket.socket:
    """aiohttp's ``socket_factory``: refuse non-public addresses before connecting."""
    family, type_, proto, _, sockaddr = addr_info
    problem = address_problem(str(sockaddr[0]))
    if problem is not None:
        raise BlockedAddressError(problem)
    return socket.socket(family=family, type=type_, proto=proto)


def check_url(url: str, *, allow_private: bool) -> None:
    """Refuse a URL that is not ``http``/``https``, or names a non-public IP literal.

    Host names are checked later, on the resolved address (:func:`guarded_socket_factory`);
    this early check only gives IP literals a clear error before any connection.
    """
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError as exc:
        raise InvalidRequestError(f"malformed URL: {exc}", parameter="url") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise InvalidRequestError(
            f"only http:// and https:// URLs are downloaded, not {parts.scheme or 'no'}: URLs",
            parameter="url",
        )
    if not host:
        raise InvalidRequestError("the URL has no host", parameter="url")
    if allow_private:
        return
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return  # a name: checked on its resolved address at connect time
    problem = address_problem(host)
    if problem is not None:
        raise InvalidRequestError(
            f"refusing to download from {problem}; pass DreamOClient(allow_private_urls=True) "
            "to allow it",
            parameter="url",
        )


class _Secret(str):
    """A header value whose ``repr`` is masked: tracebacks that show locals stay clean."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "'<secret>'"


def secret_header(value: str) -> str:
    """``value`` as a string that prints normally but whose ``repr`` hides it."""
    return _Secret(value)

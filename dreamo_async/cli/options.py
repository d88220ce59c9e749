"""Options shared by the commands, their types, and the client they configure.

Parameter ranges are read from :data:`dreamo_async.limits.DEFAULT_LIMITS` and the
choices from the request's enums: one source, not a copy beside ``Limits``.
"""

from __future__ import annotations

import functools
import math
import os
import tempfile
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal, TypeVar

import attrs
import click

from ..errors import ConfigurationError
from ..limits import DEFAULT_LIMITS
from ..request import _MODELS, RefType, RephraserLevel
from .running import EXIT_USAGE, CliExit

__all__ = [
    "RATE",
    "RateValue",
    "Service",
    "common",
    "generation_options",
    "out_folder",
    "out_option",
    "polling",
    "read_key",
    "spending",
    "writable_folder",
]

F = TypeVar("F", bound=Callable[..., Any])
#: ``--rps``: a number of requests per second, or ``"auto"``.
RateValue = float | Literal["auto"]


def writable_folder(option: str, folder: Path) -> None:
    """Create ``folder`` if missing and prove it writable, before anything is sent:
    a result paid for must have somewhere to go. A usage error (exit 2) otherwise."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe, name = tempfile.mkstemp(dir=folder, prefix=".dreamo-probe-")
        os.close(probe)
        os.unlink(name)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise click.BadParameter(
            f"cannot write into {folder}: {reason} (nothing was sent)", param_hint=f"'{option}'"
        ) from None


def out_option(
    help: str, *, default: Path | None = None, required: bool = False, check: bool = False
) -> Callable[[F], F]:
    """``--out FOLDER``; with ``check`` the folder is made and proven writable at once
    (commands that check their input first prove it later, before anything is sent)."""
    return click.option(
        "--out",
        type=click.Path(file_okay=False, path_type=Path),
        default=default,
        required=required,
        show_default=default is not None,
        callback=out_folder if check else None,
        help=help,
    )


def out_folder(ctx: click.Context, param: click.Parameter, value: Path | None) -> Path | None:
    """Click callback of ``--out``: the folder exists (created) and is writable."""
    if value is not None:
        writable_folder("--out", value)
    return value


class _Rate(click.ParamType):  # type: ignore[type-arg]  # generic from click 8.5 on
    """``--rps``: requests per second (> 0), or ``auto`` (learned from the service's 429s)."""

    name = "rate"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> RateValue:
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        try:
            rate = float(value)
        except (TypeError, ValueError):
            rate = math.nan
        if not 0 < rate < math.inf:
            self.fail(f"{value!r} is not a rate: give a number > 0 or 'auto'", param, ctx)
        return rate


RATE = _Rate()


class _Money(click.ParamType[Decimal]):
    """An amount in USD (a Decimal, so costs add up exactly)."""

    name = "usd"

    def convert(self, value: Any, param: Any, ctx: Any) -> Decimal:
        from ..coordination import to_money

        try:
            amount = to_money(value, param.name if param else "amount")
        except ConfigurationError as exc:
            self.fail(str(exc), param, ctx)
        assert amount is not None
        return amount


_MONEY = _Money()


@attrs.frozen(kw_only=True)
class Service:
    """How a command reaches the service: the options of :func:`common` (and of
    :func:`polling`, where the command has them), gathered once."""

    api_key_file: Path | None = None
    base_url: str | None = None
    allow_private_urls: bool = False
    retries: int = 4
    poll_interval: float = 1.0
    timeout: float = 600.0

    def client(
        self,
        *,
        api_key: str | None = None,
        concurrency: int = 4,
        rps: RateValue | None = None,
        max_spend: Decimal | None = None,
        expected_cost: Decimal | None = None,
    ) -> Any:
        """The command's client; the key is read now (a missing one is exit 2), and a
        configuration error is a usage error (exit 2)."""
        import dreamo_async as d

        try:
            return d.DreamOClient(
                api_key=api_key or read_key(self.api_key_file),
                base_url=self.base_url,
                max_spend=max_spend,
                expected_cost=expected_cost,
                max_concurrency=concurrency,
                requests_per_second=rps,
                burst=max(1, int(rps)) if isinstance(rps, float) else 1,
                poll=d.PollPolicy(
                    initial_delay=self.poll_interval,
                    max_delay=max(10.0, self.poll_interval),
                    timeout=self.timeout,
                ),
                retry=d.RetryPolicy(max_attempts=self.retries + 1),
                allow_private_urls=self.allow_private_urls,
            )
        except d.ConfigurationError as exc:
            raise CliExit(EXIT_USAGE, str(exc), error=exc) from None
        except ValueError as exc:  # yarl's (a port out of range) until the library says it
            raise CliExit(EXIT_USAGE, f"--base-url {self.base_url}: {exc}", error=exc) from None


_SERVICE_FIELDS = tuple(field.name for field in attrs.fields(Service))


def common(body: F) -> F:
    """Options every command that talks to the service takes; the command receives
    them (and the :func:`polling` ones) as one ``service: Service`` argument."""

    @functools.wraps(body)
    def command(**kwargs: Any) -> Any:
        given = {name: kwargs.pop(name) for name in _SERVICE_FIELDS if name in kwargs}
        return body(service=Service(**given), **kwargs)

    fn: F = command  # type: ignore[assignment]
    fn = click.option(
        "--json",
        "as_json",
        is_flag=True,
        help="Print machine-readable JSON on stdout, an error object on failure "
        "(human output goes to stderr).",
    )(fn)
    fn = click.option(
        "--allow-private-urls",
        is_flag=True,
        help="Download results from private, loopback or link-local addresses "
        "(refused by default: a URL could point into your network).",
    )(fn)
    fn = click.option(
        "--base-url",
        envvar="DREAMO_BASE_URL",
        default=None,
        metavar="URL",
        help="Service base URL (default https://cloud.vtrix.ai; env DREAMO_BASE_URL).",
    )(fn)
    fn = click.option(
        "--retries",
        type=click.IntRange(0, 20),
        default=4,
        show_default=True,
        help="Retries of a request that surely did nothing (never of an ambiguous create).",
    )(fn)
    return click.option(
        "--api-key-file",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="Read the API key from this file (default: env DREAMO_API_KEY or "
        "VTRIX_API_KEY). There is no --api-key: it would land in shell history.",
    )(fn)


def spending(fn: F) -> F:
    """The money options: a cap, and the cost assumed per task."""
    fn = click.option(
        "--expected-cost",
        type=_MONEY,
        default=None,
        metavar="USD",
        help="Cost assumed per task until the service reports costs (the cap reserves it).",
    )(fn)
    return click.option(
        "--max-spend",
        type=_MONEY,
        default=None,
        metavar="USD",
        help="Send no create that could take the spend over this many USD.",
    )(fn)


def polling(fn: F) -> F:
    fn = click.option(
        "--poll-interval",
        type=click.FloatRange(0.01, 60),
        default=1.0,
        show_default=True,
        help="First delay between polls, seconds (it grows up to 10 s).",
    )(fn)
    return click.option(
        "--timeout",
        type=click.FloatRange(0, min_open=True),
        default=600.0,
        show_default=True,
        help="Deadline of each job once created, seconds.",
    )(fn)


def generation_options(fn: F) -> F:
    """The request's knobs; ranges and choices from ``DEFAULT_LIMITS`` and the request."""
    lim = DEFAULT_LIMITS
    guidance = click.FloatRange(lim.min_guidance_scale, lim.max_guidance_scale)
    span = f"{lim.min_guidance_scale:g}-{lim.max_guidance_scale:g}"
    side = click.IntRange(lim.min_output_side, lim.max_output_side)
    sides = f"{lim.min_output_side}-{lim.max_output_side}"
    options = [
        click.option(
            "--ref-type",
            "ref_types",
            multiple=True,
            type=click.Choice([r.value for r in RefType], case_sensitive=False),
            help="One per image, in order: IP (subject), ID (face), STYLE, AUTO.",
        ),
        click.option(
            "--model",
            type=click.Choice(list(_MODELS)),
            default=None,
            help=f"Model id (default {_MODELS[0]}).",
        ),
        click.option("--guidance-scale1", type=guidance, help=f"{span}, text."),
        click.option("--guidance-scale2", type=guidance, help=f"{span}, images."),
        click.option(
            "--ddim-steps",
            type=click.IntRange(lim.min_ddim_steps, lim.max_ddim_steps),
            help=f"{lim.min_ddim_steps}-{lim.max_ddim_steps} denoising steps.",
        ),
        click.option("--swap-face/--no-swap-face", default=None, help="Face-ID enhancement."),
        click.option(
            "--use-rephraser/--no-rephraser",
            default=None,
            help="Let the server rewrite the prompt.",
        ),
        click.option(
            "--rephraser-level",
            type=click.Choice([r.value for r in RephraserLevel]),
            default=None,
            help="How finely the prompt is rewritten.",
        ),
        click.option("--seed", type=click.IntRange(-1, lim.max_seed), help="-1 = random."),
        click.option("--width", type=side, help=f"{sides}."),
        click.option("--height", type=side, help=f"{sides}."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def read_key(api_key_file: Path | None) -> str:
    from ..client import API_KEY_ENV_VARS

    if api_key_file is not None:
        try:
            key = api_key_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise CliExit(EXIT_USAGE, f"cannot read --api-key-file {api_key_file}: {exc}") from None
        if not key:
            raise CliExit(EXIT_USAGE, f"--api-key-file {api_key_file} is empty")
        return key
    for name in API_KEY_ENV_VARS:
        if value := os.environ.get(name, "").strip():
            return value
    raise CliExit(
        EXIT_USAGE,
        "no API key: set DREAMO_API_KEY (or VTRIX_API_KEY), or pass --api-key-file FILE",
    )

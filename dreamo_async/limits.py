"""Every documented limit of the service, in one frozen object.

This is the single source of truth: the request checks, the image checks, the
fake server and the README table all read these numbers. Users override any of
them with ``attrs.evolve(DEFAULT_LIMITS, ...)`` or ``Limits(...)`` and pass the
result to ``DreamOClient(limits=...)``.

Where the provider's documentation leaves a value unknown (the docs' "Limits and
checks" page), the default is the safe side: "MB" in "4.7 MB" is read as 10**6 bytes,
the smaller reading.
"""

from __future__ import annotations

import enum
from typing import Any, Final

import attrs

__all__ = ["DEFAULT_LIMITS", "CheckPolicy", "Limits"]


class CheckPolicy(enum.StrEnum):
    """What to do when an advisory limit is crossed."""

    #: Refuse the request with an ``InvalidRequestError`` / ``ImageError``.
    ERROR = "error"
    #: Emit a ``DreamOWarning`` through :mod:`warnings` and send anyway.
    WARN = "warn"
    #: Do not check.
    OFF = "off"


def _positive(instance: Any, attribute: Any, value: Any) -> None:
    if value is not None and not (isinstance(value, int | float) and value > 0):
        raise ValueError(f"Limits.{attribute.name} must be positive, got {value!r}")


@attrs.frozen(kw_only=True)
class Limits:
    """The limits checked on the client before anything is sent.

    Hard limits (sizes, counts, ranges) always refuse. The aspect-ratio and
    prompt-length limits are recommendations of the provider ("may cause errors"),
    so each has a :class:`CheckPolicy`.
    """

    # -- images --------------------------------------------------------------
    #: Fewest reference images per request.
    min_images: int = attrs.field(default=1, validator=_positive)
    #: Most reference images per request (``spark_dreamo`` takes exactly one).
    max_images: int = attrs.field(default=5, validator=_positive)
    #: Largest raw image file in bytes, before base64 ("4.7 MB", read as 10**6).
    max_image_bytes: int = attrs.field(default=4_700_000, validator=_positive)
    #: Largest image width in pixels.
    max_image_width: int = attrs.field(default=4096, validator=_positive)
    #: Largest image height in pixels.
    max_image_height: int = attrs.field(default=4096, validator=_positive)
    #: Widest accepted aspect ratio, width / height (16:9).
    max_aspect_ratio: float = attrs.field(default=16 / 9, validator=_positive)
    #: Tallest accepted aspect ratio, width / height (9:16).
    min_aspect_ratio: float = attrs.field(default=9 / 16, validator=_positive)
    #: What to do with an image outside the aspect range.
    aspect_policy: CheckPolicy = attrs.field(default=CheckPolicy.ERROR, converter=CheckPolicy)

    # -- prompt --------------------------------------------------------------
    #: Recommended longest prompt, in characters ("about 300").
    prompt_recommended_chars: int = attrs.field(default=300, validator=_positive)
    #: What to do with a prompt longer than the recommendation.
    prompt_policy: CheckPolicy = attrs.field(default=CheckPolicy.WARN, converter=CheckPolicy)
    #: Hard cap on prompt length (undocumented, so off by default: ``None``).
    max_prompt_chars: int | None = attrs.field(default=None, validator=_positive)

    # -- generation parameters ------------------------------------------------
    min_guidance_scale: float = 1.0
    max_guidance_scale: float = 7.0
    min_ddim_steps: int = 1
    max_ddim_steps: int = 50
    min_output_side: int = 512
    max_output_side: int = 2048
    #: width * height of the output must stay at or below this (2048 x 2048).
    max_output_pixels: int = 2048 * 2048
    #: Largest seed accepted (the API documents -1 = random; int32 is the safe range).
    max_seed: int = 2**31 - 1

    # -- transport -----------------------------------------------------------
    #: Largest response body read from the API, in bytes (a larger answer is an error).
    max_response_bytes: int = attrs.field(default=8 * 1024 * 1024, validator=_positive)
    #: Largest result image downloaded, in bytes.
    max_download_bytes: int = attrs.field(default=64 * 1024 * 1024, validator=_positive)

    def __attrs_post_init__(self) -> None:
        if self.min_images > self.max_images:
            raise ValueError("Limits.min_images must not exceed max_images")
        if self.min_aspect_ratio > self.max_aspect_ratio:
            raise ValueError("Limits.min_aspect_ratio must not exceed max_aspect_ratio")


#: The provider's documented limits.
DEFAULT_LIMITS: Final = Limits()

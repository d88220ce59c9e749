"""The service's own checks of a create body (API.md), as the fake server applies them.

Written independently of the client's checks on purpose: if both were the same
code, a wrong limit would pass on both sides and the tests would prove nothing.
Every refusal names the parameter and the value, like a helpful real service.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Mapping
from typing import Any, Final, NoReturn

import attrs

from ..limits import Limits
from ._images import image_info

__all__ = ["MODELS", "CreateRequest", "Refusal", "parse_create_body"]

MODELS: Final = ("spark_multi_dreamo", "spark_dreamo")
REF_TYPES: Final = ("IP", "ID", "STYLE", "AUTO")
REPHRASER_LEVELS: Final = ("general", "fine", "coarse")
DEFAULT_SIDE: Final = 1328
KNOWN_PARAMS: Final = frozenset(
    {
        "prompt",
        "binary_data_base64",
        "image_urls",
        "ref_type_list",
        "guidance_scale1",
        "guidance_scale2",
        "ddim_steps",
        "swap_face",
        "use_rephraser",
        "rephraser_level",
        "seed",
        "width",
        "height",
    }
)

MISSING_PROMPT: Final = "003013001"
MISSING_IMAGE: Final = "003013002"
INVALID_PROMPT_LENGTH: Final = "003013003"
INVALID_PARAMETER: Final = "003013004"


class Refusal(Exception):
    """An error answer the simulated service gives instead of doing the work.

    ``reason`` is the short key counted in ``ServerStats.refused``; ``retry_after``
    (seconds) becomes a ``Retry-After`` header.
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        reason: str,
        *,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.reason = reason
        self.retry_after = retry_after


def _invalid(reason: str, message: str, code: str = INVALID_PARAMETER) -> NoReturn:
    raise Refusal(400, code, message, reason)


@attrs.frozen
class CreateRequest:
    """A create body that passed every check (images reduced to their count and URLs)."""

    model: str
    prompt: str
    #: The parameters without the image data (kept for tests; small).
    params: Mapping[str, Any]
    image_count: int
    image_urls: tuple[str, ...] = ()


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON")


def parse_create_body(raw: bytes, limits: Limits, *, strict_params: bool = True) -> CreateRequest:
    """Check a create body as the service would; raise :class:`Refusal` on the first problem.

    CPU-bound for big bodies (JSON of up to 5 base64 images, then decoding them),
    so the server runs it in a worker thread when the body is large.
    """
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        _invalid("body", f"request body is not valid JSON: {exc}")
    if not isinstance(body, dict):
        _invalid("body", 'request body must be an object {"model", "input": [{"params"}]}')
    model = body.get("model")
    if model not in MODELS:
        _invalid("model", f"invalid parameter model={model!r}: must be one of {', '.join(MODELS)}")
    items = body.get("input")
    if not isinstance(items, list) or len(items) != 1 or not isinstance(items[0], dict):
        _invalid("body", "invalid parameter input: must be a list of exactly one {params} object")
    params = items[0].get("params")
    if not isinstance(params, dict):
        _invalid("body", "invalid parameter input[0].params: must be an object")
    return _check_params(model, params, limits, strict_params=strict_params)


def _check_params(
    model: str, params: dict[str, Any], limits: Limits, *, strict_params: bool
) -> CreateRequest:
    if strict_params:
        unknown = sorted(set(params) - KNOWN_PARAMS)
        if unknown:
            _invalid(unknown[0], f"unknown parameter {unknown[0]}={params[unknown[0]]!r}")
    prompt = params.get("prompt")
    if prompt is None or (isinstance(prompt, str) and not prompt.strip()):
        _invalid("prompt", "missing prompt", MISSING_PROMPT)
    if not isinstance(prompt, str):
        _invalid("prompt", f"invalid parameter prompt={prompt!r}: must be a string")
    if limits.max_prompt_chars is not None and len(prompt) > limits.max_prompt_chars:
        _invalid(
            "prompt",
            f"invalid prompt length {len(prompt)}: at most {limits.max_prompt_chars} characters",
            INVALID_PROMPT_LENGTH,
        )
    image_count, urls = _check_images(model, params, limits)
    _check_ref_types(params, image_count)
    for name in ("guidance_scale1", "guidance_scale2"):
        _check_number(params, name, limits.min_guidance_scale, limits.max_guidance_scale)
    _check_number(params, "ddim_steps", limits.min_ddim_steps, limits.max_ddim_steps, integer=True)
    _check_number(params, "seed", -1, limits.max_seed, integer=True)
    for name in ("width", "height"):
        _check_number(params, name, limits.min_output_side, limits.max_output_side, integer=True)
    width = params.get("width", DEFAULT_SIDE)
    height = params.get("height", DEFAULT_SIDE)
    if width * height > limits.max_output_pixels:
        _invalid(
            "width",
            f"invalid parameter width*height={width}*{height}={width * height}: "
            f"at most {limits.max_output_pixels} pixels",
        )
    for name in ("swap_face", "use_rephraser"):
        if name in params and not isinstance(params[name], bool):
            _invalid(name, f"invalid parameter {name}={params[name]!r}: must be a boolean")
    level = params.get("rephraser_level", REPHRASER_LEVELS[0])
    if level not in REPHRASER_LEVELS:
        _invalid(
            "rephraser_level",
            f"invalid parameter rephraser_level={level!r}: must be one of "
            f"{', '.join(REPHRASER_LEVELS)}",
        )
    kept = {k: v for k, v in params.items() if k not in ("binary_data_base64", "image_urls")}
    return CreateRequest(
        model=model, prompt=prompt, params=kept, image_count=image_count, image_urls=urls
    )


def _check_images(
    model: str, params: Mapping[str, Any], limits: Limits
) -> tuple[int, tuple[str, ...]]:
    binary = params.get("binary_data_base64")
    urls = params.get("image_urls")
    if binary is None and urls is None:
        _invalid("images", "missing image: send binary_data_base64 or image_urls", MISSING_IMAGE)
    if binary is not None and urls is not None:
        _invalid("images", "invalid parameter: send binary_data_base64 or image_urls, not both")
    name = "binary_data_base64" if binary is not None else "image_urls"
    images = binary if binary is not None else urls
    if isinstance(images, list) and not images:
        _invalid(name, f"missing image: {name} is empty", MISSING_IMAGE)
    if not isinstance(images, list):
        _invalid(name, f"invalid parameter {name}: must be a list of strings")
    low, high = limits.min_images, limits.max_images
    if model == "spark_dreamo":
        low = high = 1
    if not low <= len(images) <= high:
        allowed = f"exactly {low}" if low == high else f"{low}-{high}"
        _invalid(name, f"invalid parameter {name}: {len(images)} images, {allowed} allowed")
    for index, item in enumerate(images):
        if not isinstance(item, str):
            _invalid(name, f"invalid parameter {name}[{index}]: must be a string")
        if binary is not None:
            _check_encoded_image(index, item, limits)
        elif not item.startswith(("http://", "https://")) or len(item) < 10:
            _invalid(
                name, f"invalid parameter image_urls[{index}]={item[:80]!r}: not an http(s) URL"
            )
    return len(images), (tuple(images) if urls is not None else ())


def _check_encoded_image(index: int, encoded: str, limits: Limits) -> None:
    name = f"binary_data_base64[{index}]"
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        _invalid("binary_data_base64", f"invalid parameter {name}: not valid base64")
    if len(data) > limits.max_image_bytes:
        _invalid(
            "binary_data_base64",
            f"invalid parameter {name}: image is {len(data)} bytes, "
            f"at most {limits.max_image_bytes} allowed",
        )
    info = image_info(data)
    if info is None:
        _invalid(
            "binary_data_base64",
            f"invalid parameter {name}: not a JPEG or PNG image (starts {data[:8]!r})",
        )
    kind, width, height = info
    if width > limits.max_image_width or height > limits.max_image_height or not width * height:
        _invalid(
            "binary_data_base64",
            f"invalid parameter {name}: {kind} of {width}x{height} pixels, at most "
            f"{limits.max_image_width}x{limits.max_image_height} allowed",
        )


def _check_ref_types(params: Mapping[str, Any], image_count: int) -> None:
    if "ref_type_list" not in params:
        return
    refs = params["ref_type_list"]
    if not isinstance(refs, list) or len(refs) != image_count:
        _invalid(
            "ref_type_list",
            f"invalid parameter ref_type_list={refs!r}: must be a list of {image_count} "
            f"(one per image)",
        )
    for ref in refs:
        if ref not in REF_TYPES:
            _invalid(
                "ref_type_list",
                f"invalid parameter ref_type_list={refs!r}: {ref!r} is not one of "
                f"{', '.join(REF_TYPES)}",
            )


def _check_number(
    params: Mapping[str, Any], name: str, low: float, high: float, *, integer: bool = False
) -> None:
    if name not in params:
        return
    value = params[name]
    kind = "an integer" if integer else "a number"
    numeric = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not numeric:
        _invalid(name, f"invalid parameter {name}={value!r}: must be {kind}")
    if not (math.isfinite(value) and low <= value <= high):
        _invalid(name, f"invalid parameter {name}={value!r}: must be {kind} from {low} to {high}")

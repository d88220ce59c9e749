"""What a user asks for: :class:`GenerationRequest`, checked once, at construction.

Every documented parameter range of the service (the docs' "Limits and checks"
page) is checked here, so a request that exists is a request the service will take
(images are checked in full later, by the preprocessing stage, when their bytes are
read). Each error names the parameter, the limit and the value.
"""

from __future__ import annotations

import difflib
import enum
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final, TypedDict

import attrs

from .errors import DreamOWarning, InvalidRequestError
from .images import ImageInput, ImageSource, classify_images
from .limits import DEFAULT_LIMITS, CheckPolicy, Limits

__all__ = [
    "MULTI_IP_MODEL",
    "SINGLE_IMAGE_MODEL",
    "SIZE_PRESETS",
    "GenerationParams",
    "GenerationRequest",
    "RefType",
    "RephraserLevel",
]

#: Model id of Spark DreamO Multi-IP (1-5 reference images).
MULTI_IP_MODEL: Final = "spark_multi_dreamo"
#: Model id of the single-image sibling (exactly one reference image).
SINGLE_IMAGE_MODEL: Final = "spark_dreamo"
_MODELS: Final = (MULTI_IP_MODEL, SINGLE_IMAGE_MODEL)


class RefType(enum.StrEnum):
    """How the service should use a reference image."""

    #: The subject (an object, a character).
    IP = "IP"
    #: A face identity.
    ID = "ID"
    #: A style.
    STYLE = "STYLE"
    #: The server decides (slower).
    AUTO = "AUTO"


class RephraserLevel(enum.StrEnum):
    """How finely the server rewrites the prompt (finer is slower, not always better)."""

    GENERAL = "general"
    FINE = "fine"
    COARSE = "coarse"


#: The provider's recommended output sizes, ratio -> (width, height).
SIZE_PRESETS: Final = {
    "1:1": (1328, 1328),
    "4:3": (1472, 1104),
    "3:2": (1584, 1056),
    "16:9": (1664, 936),
    "21:9": (2016, 864),
}

_DEFAULT_SIDE: Final = 1328


def _enum_value(enum_type: type[enum.Enum], value: object, parameter: str) -> Any:
    try:
        if isinstance(value, str) and not isinstance(value, enum.Enum):
            return enum_type(
                value.strip() if enum_type is RephraserLevel else value.strip().upper()
            )
        return enum_type(value)
    except ValueError:
        allowed = ", ".join(str(member.value) for member in enum_type)
        raise InvalidRequestError(
            f"{parameter} must be one of {allowed}; got {value!r}", parameter=parameter
        ) from None


def _to_ref_types(value: Iterable[RefType | str] | None) -> tuple[RefType, ...] | None:
    if value is None:
        return None
    if isinstance(value, str | bytes):
        raise InvalidRequestError(
            f"ref_types must be a list with one entry per image; got the string {value!r}",
            parameter="ref_types",
        )
    return tuple(_enum_value(RefType, item, f"ref_types[{i}]") for i, item in enumerate(value))


def _to_rephraser(value: RephraserLevel | str | None) -> RephraserLevel | None:
    if value is None:
        return None
    return _enum_value(RephraserLevel, value, "rephraser_level")  # type: ignore[no-any-return]


def _to_sources(value: Sequence[object] | ImageSource | object) -> tuple[ImageSource, ...]:
    if type(value) is list and value and type(value[0]) is not ImageSource:
        return classify_images(value)  # the common case: a list of the user's images
    if (
        isinstance(value, _BARE_IMAGE_TYPES)
        or not isinstance(value, Iterable)
        or callable(getattr(value, "read", None))  # a file object is one image, not lines
    ):
        # A single image passed bare: accept it as a list of one.
        value = [value]
    items = list(value)
    if items and all(isinstance(item, ImageSource) for item in items):
        return tuple(items)
    return classify_images(items)


#: Image values that are iterable but are one image (tuple: a union is rebuilt per call).
_BARE_IMAGE_TYPES: Final = (str, bytes, bytearray, memoryview)


@attrs.frozen(kw_only=True, slots=False)  # one per job: dict init is twice as fast
class GenerationRequest:
    """One generation: a prompt plus 1-5 reference images and optional knobs.

    ``None`` for an optional parameter means "not sent": the service applies its
    own default (shown in brackets). Construction checks every documented limit
    and raises :class:`~dreamo_async.InvalidRequestError` naming what is wrong.
    """

    #: The text instruction (Chinese or English; about 300 characters recommended).
    prompt: str
    #: 1-5 reference images: paths, bytes, file objects, data URIs or http(s) URLs.
    images: tuple[ImageSource, ...] = attrs.field(converter=_to_sources)
    #: ``spark_multi_dreamo`` (default) or ``spark_dreamo`` (exactly one image).
    model: str = MULTI_IP_MODEL
    #: One :class:`RefType` per image [AUTO].
    ref_types: tuple[RefType, ...] | None = attrs.field(default=None, converter=_to_ref_types)
    #: 1.0-7.0, higher follows the text more [2.5].
    guidance_scale1: float | None = None
    #: 1.0-7.0, higher follows the images more [2.5].
    guidance_scale2: float | None = None
    #: 1-50 denoising steps [12].
    ddim_steps: int | None = None
    #: Face-ID enhancement [False].
    swap_face: bool | None = None
    #: Let the server rewrite the prompt [True].
    use_rephraser: bool | None = None
    #: ``general`` / ``fine`` / ``coarse`` [general].
    rephraser_level: RephraserLevel | None = attrs.field(default=None, converter=_to_rephraser)
    #: -1 for random; the same positive seed and parameters give (most likely) the same image.
    seed: int | None = None
    #: Output width, 512-2048 [1328].
    width: int | None = None
    #: Output height, 512-2048 [1328]; width * height <= 2048 * 2048.
    height: int | None = None
    #: The limits checked against; a client passes its own.
    limits: Limits = attrs.field(default=DEFAULT_LIMITS, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        self.check(self.limits)

    def check(self, limits: Limits) -> None:
        """Check every parameter against ``limits``; raise on the first problem.

        Called at construction (``__attrs_post_init__``), so also by ``attrs.evolve``,
        which is how a client gives a request its own limits (``build_request``).
        """
        _check_prompt(self.prompt, limits)
        _check_model_and_images(self, limits)
        # Each optional parameter is checked only when given (None: the service's default).
        if self.guidance_scale1 is not None:
            low, high = limits.min_guidance_scale, limits.max_guidance_scale
            _check_number("guidance_scale1", self.guidance_scale1, low, high, integer=False)
        if self.guidance_scale2 is not None:
            low, high = limits.min_guidance_scale, limits.max_guidance_scale
            _check_number("guidance_scale2", self.guidance_scale2, low, high, integer=False)
        if self.ddim_steps is not None:
            low, high = limits.min_ddim_steps, limits.max_ddim_steps
            _check_number("ddim_steps", self.ddim_steps, low, high, integer=True)
        if self.seed is not None:
            _check_number("seed", self.seed, -1, limits.max_seed, integer=True)
        width, height = self.width, self.height
        if width is not None:
            _check_number(
                "width", width, limits.min_output_side, limits.max_output_side, integer=True
            )
        else:
            width = _DEFAULT_SIDE
        if height is not None:
            _check_number(
                "height", height, limits.min_output_side, limits.max_output_side, integer=True
            )
        else:
            height = _DEFAULT_SIDE
        if width * height > limits.max_output_pixels:
            raise InvalidRequestError(
                f"width * height must be at most {limits.max_output_pixels} "
                f"(2048 x 2048); got {width} x {height} = {width * height}",
                parameter="width",
            )
        if self.swap_face is not None and not isinstance(self.swap_face, bool):
            raise InvalidRequestError(
                f"swap_face must be True or False; got {self.swap_face!r}", parameter="swap_face"
            )
        if self.use_rephraser is not None and not isinstance(self.use_rephraser, bool):
            raise InvalidRequestError(
                f"use_rephraser must be True or False; got {self.use_rephraser!r}",
                parameter="use_rephraser",
            )

    @property
    def uses_urls_only(self) -> bool:
        """True when every image is an http(s) URL, sent as ``image_urls``."""
        return all(source.is_url for source in self.images)


def _check_prompt(prompt: object, limits: Limits) -> None:
    if not isinstance(prompt, str):
        raise InvalidRequestError(
            f"prompt must be a string; got {type(prompt).__name__}", parameter="prompt"
        )
    if not prompt.strip():
        raise InvalidRequestError("prompt must not be empty", parameter="prompt")
    _check_sendable("prompt", prompt)
    length = len(prompt)
    if limits.max_prompt_chars is not None and length > limits.max_prompt_chars:
        raise InvalidRequestError(
            f"prompt must be at most {limits.max_prompt_chars} characters; got {length}",
            parameter="prompt",
        )
    if length > limits.prompt_recommended_chars:
        text = (
            f"prompt is {length} characters; the service recommends about "
            f"{limits.prompt_recommended_chars} (longer prompts may not take effect and "
            f"may cause errors; consider use_rephraser=False)"
        )
        if limits.prompt_policy is CheckPolicy.ERROR:
            raise InvalidRequestError(text, parameter="prompt")
        if limits.prompt_policy is CheckPolicy.WARN:
            warnings.warn(text, DreamOWarning, stacklevel=5)


def _check_sendable(name: str, text: str) -> None:
    """Refuse text that cannot be encoded as UTF-8 (a lone surrogate, say ``"\\ud800"``),
    which would otherwise crash the create after the job took its slot."""
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError as exc:
            where = f"{text[exc.start]!r} at position {exc.start}: {exc.reason}"
            message = f"{name} holds a character that cannot be sent ({where})"
            raise InvalidRequestError(message, parameter=name) from None


def _check_model_and_images(request: GenerationRequest, limits: Limits) -> None:
    if not isinstance(request.model, str):
        raise InvalidRequestError(
            f"model must be a string; got {type(request.model).__name__}", parameter="model"
        )
    if request.model not in _MODELS:  # a known model id is sendable text
        raise InvalidRequestError(
            f"model must be one of {', '.join(_MODELS)}; got {request.model!r}",
            parameter="model",
        )
    count = len(request.images)
    low, high = limits.min_images, limits.max_images
    if request.model == SINGLE_IMAGE_MODEL:
        low = high = 1
    if not low <= count <= high:
        expected = f"exactly {low}" if low == high else f"{low}-{high}"
        noun = "reference image" if high == 1 else "reference images"
        raise InvalidRequestError(
            f"{request.model} takes {expected} {noun}; got {count}",
            parameter="images",
        )
    if request.ref_types is not None and len(request.ref_types) != count:
        raise InvalidRequestError(
            f"ref_types must have one entry per image ({count}); got {len(request.ref_types)}",
            parameter="ref_types",
        )


def _check_number(name: str, value: object, low: float, high: float, *, integer: bool) -> None:
    """Refuse a non-number (or a non-integer) or one outside ``low..high``; ``value`` is
    never None (the callers skip parameters left to the service's default)."""
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequestError(f"{name} must be {kind}; got {value!r}", parameter=name)
    if integer and not isinstance(value, int):
        raise InvalidRequestError(f"{name} must be {kind}; got {value!r}", parameter=name)
    if not math.isfinite(value) or not low <= value <= high:
        raise InvalidRequestError(
            f"{name} must be between {_num(low)} and {_num(high)}; got {value!r}", parameter=name
        )


def _num(value: float) -> str:
    """A limit as people write it: 1 and 2147483647, not 1.0 and 2.14748e+09."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


class GenerationParams(TypedDict, total=False):
    """The keywords of ``generate``, ``submit`` and the items of ``generate_many``: the
    fields of :class:`GenerationRequest` (a test checks that the two agree), so type
    checkers and editors catch a misspelt keyword or a wrong type."""

    prompt: str
    images: ImageInput | ImageSource | Sequence[ImageInput | ImageSource]
    model: str
    ref_types: Iterable[RefType | str] | None
    guidance_scale1: float | None
    guidance_scale2: float | None
    ddim_steps: int | None
    swap_face: bool | None
    use_rephraser: bool | None
    rephraser_level: RephraserLevel | str | None
    seed: int | None
    width: int | None
    height: int | None


#: The keywords a call takes: the request's fields, but ``limits`` (the client's own).
_KEYWORDS: Final = frozenset(f.name for f in attrs.fields(GenerationRequest)) - {"limits"}


def check_keywords(params: Mapping[str, object]) -> None:
    """Refuse a keyword that is no field of :class:`GenerationRequest`, naming it and the
    closest one (``steps``: "did you mean ddim_steps?"), before anything is sent."""
    if _KEYWORDS.issuperset(params):
        return
    unknown = sorted(set(params) - _KEYWORDS)
    name = unknown[0]
    if name == "limits":
        hint = "limits belong to the client: DreamOClient(limits=...)"
    else:
        close = difflib.get_close_matches(name, _KEYWORDS, n=1, cutoff=0.5)
        if not close:  # a short name inside a long one: steps -> ddim_steps
            close = sorted(k for k in _KEYWORDS if len(name) >= 4 and name in k)[:1]
        hint = f"did you mean {close[0]}?" if close else f"known: {', '.join(sorted(_KEYWORDS))}"
    raise InvalidRequestError(
        f"unknown parameter {name!r} ({hint})"
        + (f"; also unknown: {', '.join(unknown[1:])}" if len(unknown) > 1 else ""),
        parameter=name,
    )

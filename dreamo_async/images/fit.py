"""Optional ``fit`` mode: shrink a JPEG or PNG that breaks the size or resolution limit.

Needs Pillow (``pip install 'dreamo_async[pillow]'``), imported only when an
image actually needs fitting. Rules, chosen so that fitting can only make an
image *acceptable*, never different in content:

* Images already within the limits pass untouched (same bytes, no re-encode).
* Never crops and never changes the aspect ratio: one scale factor for both
  sides (each side rounded to a whole pixel), first to fit the resolution
  limit, then smaller only if the file is still over the byte limit.
* The result is a baseline JPEG (quality 90, then 80), upright (EXIF rotation
  applied to the pixels, since the tag is not copied), keeping the ICC profile
  when the colour mode is unchanged. Transparency is flattened onto white.
  Other metadata (EXIF, GPS) is not copied.
* Only JPEG and PNG inputs are fitted: other formats are still refused by the
  format check (converting them silently is a different feature).
* Inputs larger than Pillow's ``Image.MAX_IMAGE_PIXELS`` are refused instead of
  decoded (Pillow's decompression-bomb guard; raise that global to allow more).
  JPEGs are decoded at a reduced scale (``draft``) when that is enough, which is
  fast and keeps memory low.
"""

from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING, Final

from ..limits import Limits
from .classify import image_error
from .headers import HeaderError, ImageHeader, read_header

if TYPE_CHECKING:
    from PIL import Image as PILImage

__all__ = ["fit_image"]

#: JPEG qualities tried at each scale: 90 looks like the original, 80 is still clean.
_QUALITIES: Final = (90, 80)
#: Scales tried at most; each aims 10 % under the byte limit, so two or three suffice.
_MAX_ROUNDS: Final = 6
#: Pillow modes whose ICC profile still describes the RGB (or gray) output.
_RGB_MODES: Final = frozenset({"RGB", "RGBA", "RGBa", "RGBX", "P"})
_GRAY_MODES: Final = frozenset({"L", "I", "I;16", "I;16B", "I;16L", "I;16N"})


def fit_image(
    data: bytes | memoryview, *, index: int, source: str, limits: Limits
) -> bytes | memoryview:
    """Return ``data`` itself when it fits the limits, else a smaller JPEG of the same picture."""
    try:
        header = read_header(data)
    except HeaderError:
        return data  # not a usable JPEG/PNG: inspect_image reports why
    if _fits(header.width, header.height, len(data), limits):
        return data
    _require_pillow(index, source)
    from PIL import Image

    bomb_limit = Image.MAX_IMAGE_PIXELS
    if bomb_limit is not None and header.width * header.height > bomb_limit:
        raise image_error(
            index,
            source,
            f"is {header.width} x {header.height} pixels, too many to decode safely for "
            f"fitting (PIL.Image.MAX_IMAGE_PIXELS is {bomb_limit:,})",
        )
    picture, icc = _decode_upright(data, header, _scale(header, limits), index, source)
    return _shrink(picture, icc, limits, index, source)


def _fits(width: int, height: int, size: int, limits: Limits) -> bool:
    return (
        size <= limits.max_image_bytes
        and width <= limits.max_image_width
        and height <= limits.max_image_height
    )


def _require_pillow(index: int, source: str) -> None:
    try:
        import PIL.Image  # noqa: F401
    except ImportError as exc:
        raise image_error(
            index,
            source,
            "needs fitting (fit=True), which needs Pillow: pip install 'dreamo_async[pillow]'",
        ) from exc


def _scale(header: ImageHeader, limits: Limits) -> float:
    """The one factor that brings the displayed picture within the resolution limit."""
    width, height = header.width, header.height
    if header.orientation >= 5:
        width, height = height, width
    return min(1.0, limits.max_image_width / width, limits.max_image_height / height)


def _decode_upright(
    data: bytes | memoryview, header: ImageHeader, scale: float, index: int, source: str
) -> tuple[PILImage.Image, bytes | None]:
    """Decode, apply EXIF rotation, convert to L or RGB; also the ICC profile if still valid.

    A JPEG is decoded at 1/2, 1/4 or 1/8 scale (``draft``) when that still
    leaves at least the target size: faster, and a quarter of the memory or less.
    """
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(data)) as opened:
            if header.format == "jpeg" and scale < 1.0:
                target = (math.ceil(header.width * scale), math.ceil(header.height * scale))
                opened.draft(opened.mode, target)
            upright = ImageOps.exif_transpose(opened)
            mode = upright.mode
            icc = upright.info.get("icc_profile")
            picture = _to_rgb_or_l(upright)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise image_error(index, source, f"could not be decoded for fitting: {exc}") from None
    # An ICC profile describes the original colour space: keep it only if that is unchanged.
    same_space = (mode in _RGB_MODES and picture.mode == "RGB") or (
        mode in _GRAY_MODES and picture.mode == "L"
    )
    return picture, icc if same_space and isinstance(icc, bytes) else None


def _to_rgb_or_l(image: PILImage.Image) -> PILImage.Image:
    """A mode JPEG can store: L or RGB (alpha flattened on white, 16-bit scaled to 8-bit)."""
    from PIL import Image

    if image.mode in ("L", "RGB"):
        return image
    if image.mode in _GRAY_MODES:
        return image.point(lambda value: value / 257).convert("L")
    if (image.mode == "P" and "transparency" in image.info) or image.mode in ("PA", "LA", "La"):
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "RGBa"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB")


def _shrink(
    picture: PILImage.Image, icc: bytes | None, limits: Limits, index: int, source: str
) -> bytes:
    """Scale to the resolution limit, then lower the quality, then the scale, until it fits."""
    width, height = picture.size
    scale = min(1.0, limits.max_image_width / width, limits.max_image_height / height)
    for _ in range(_MAX_ROUNDS):
        size = _whole_pixels(width, height, scale, limits)
        resized = picture if size == picture.size else picture.resize(size, reducing_gap=3.0)
        for quality in _QUALITIES:
            encoded = _encode_jpeg(resized, quality, icc)
            if len(encoded) <= limits.max_image_bytes:
                return encoded
        # Bytes grow roughly with the pixel count: aim 10 % under the limit.
        scale *= min(0.9, math.sqrt(limits.max_image_bytes / len(encoded)) * 0.9)
    raise image_error(index, source, f"could not be fitted under {limits.max_image_bytes:,} bytes")


def _whole_pixels(width: int, height: int, scale: float, limits: Limits) -> tuple[int, int]:
    """The whole-pixel size nearest the exact scaled one in aspect ratio, within the limits.

    Rounding each side separately can push a picture at exactly 16:9 just past
    the aspect limit (640 x 360 at 200 wide: 200 x 112 is 1.786), which would
    turn an accepted image into a refused one; among the floor/ceil candidates
    the ones inside the aspect range win, then the closest ratio.
    """
    exact_w, exact_h = width * scale, height * scale
    candidates = {
        (max(1, w), max(1, h))
        for w in (math.floor(exact_w), math.ceil(exact_w))
        for h in (math.floor(exact_h), math.ceil(exact_h))
    }
    fitting = [
        (w, h)
        for w, h in candidates
        if w <= limits.max_image_width and h <= limits.max_image_height
    ]
    in_range = [
        (w, h) for w, h in fitting if limits.min_aspect_ratio <= w / h <= limits.max_aspect_ratio
    ]
    ratio = width / height
    return min(in_range or fitting, key=lambda wh: (abs(wh[0] / wh[1] - ratio), -wh[0] * wh[1]))


def _encode_jpeg(image: PILImage.Image, quality: int, icc: bytes | None) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality, icc_profile=icc)
    return out.getvalue()

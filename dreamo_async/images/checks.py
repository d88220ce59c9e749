"""The checks of one image by its bytes (pure): format, size, header, resolution, aspect.

EXIF orientation: the resolution check uses the stored size (what a decoder
allocates), the aspect check the displayed size (what the model and the user
see). With the documented limits both checks are symmetric, so a rotation never
changes a verdict; the distinction only matters for custom asymmetric limits.
"""

from __future__ import annotations

from typing import Literal

import attrs

from ..errors import ImageError
from ..limits import DEFAULT_LIMITS, CheckPolicy, Limits
from .classify import image_error
from .headers import HeaderError, read_header, sniff_format

__all__ = ["ImageInfo", "check_limits", "inspect_image", "too_large"]


@attrs.frozen
class ImageInfo:
    """What the header says about an accepted image (``width``/``height`` as stored)."""

    format: Literal["jpeg", "png"]
    width: int
    height: int
    size: int
    #: EXIF orientation 1-8; 5-8 mean the image is shown rotated by 90 degrees.
    orientation: int = 1

    @property
    def displayed_size(self) -> tuple[int, int]:
        """``(width, height)`` as a viewer shows the image, after EXIF rotation."""
        if self.orientation >= 5:
            return self.height, self.width
        return self.width, self.height


# --------------------------------------------------------------------------- inspect


def inspect_image(
    data: bytes | bytearray | memoryview,
    *,
    index: int,
    source: str,
    limits: Limits = DEFAULT_LIMITS,
) -> tuple[ImageInfo, list[str]]:
    """Check one image by its bytes, without decoding pixels.

    Checks, in the order a user can best act on them: format (by content, never
    by name), file size, header integrity, resolution, aspect ratio. Returns the
    header facts and the advisory texts to emit as :class:`DreamOWarning`
    (returned, not emitted: this runs in a worker thread, and ``warnings``
    filters are not thread-safe). Every refusal is an :class:`ImageError` that
    names the image, the limit and the value.
    """
    size = len(data) if not isinstance(data, memoryview) else data.nbytes
    if size == 0:
        raise image_error(index, source, "is empty (0 bytes)")
    head = bytes(data[:512])
    kind = sniff_format(head)
    if kind not in ("JPEG", "PNG"):
        what = kind or f"not a recognisable image (it starts with {head[:8].hex(' ')})"
        raise image_error(index, source, f"is {what}; the service accepts JPEG or PNG")
    if size > limits.max_image_bytes:  # before reading the header: the likelier fix
        raise image_error(index, source, too_large(size, limits.max_image_bytes, limits, False))
    try:
        header = read_header(data)
    except HeaderError as exc:
        text = str(exc)
        detail = text if text.startswith("is ") else f"is unusable: {text}"
        raise image_error(index, source, detail) from None
    info = ImageInfo(header.format, header.width, header.height, size, header.orientation)
    note = check_limits(info, index, source, limits)
    return info, [note] if note else []


def check_limits(info: ImageInfo, index: int, source: str, limits: Limits) -> str | None:
    """Size, resolution and aspect of known header facts against ``limits``: raise, or
    return the advisory text. For a fresh image and for one from ENCODED_CACHE alike."""
    if info.size > limits.max_image_bytes:
        raise image_error(
            index, source, too_large(info.size, limits.max_image_bytes, limits, False)
        )
    _check_resolution(info.width, info.height, index, source, limits)
    return _check_aspect(info, index, source, limits)


def _check_resolution(width: int, height: int, index: int, source: str, limits: Limits) -> None:
    if width > limits.max_image_width or height > limits.max_image_height:
        raise image_error(
            index,
            source,
            f"is {width} x {height} pixels; the limit is "
            f"{limits.max_image_width} x {limits.max_image_height}",
        )


def _check_aspect(info: ImageInfo, index: int, source: str, limits: Limits) -> str | None:
    """Refuse (ERROR) or describe (WARN) an aspect ratio outside the recommended range."""
    if limits.aspect_policy is CheckPolicy.OFF:
        return None
    width, height = info.displayed_size
    ratio = width / height
    if limits.min_aspect_ratio <= ratio <= limits.max_aspect_ratio:
        return None
    shown = " as displayed" if info.orientation >= 5 else ""
    text = (
        f"image {index + 1} ({source}) has an aspect ratio of {ratio:.2f} ({width} x {height}"
        f"{shown}); the service recommends {limits.min_aspect_ratio:.2f} (9:16) to "
        f"{limits.max_aspect_ratio:.2f} (16:9) and may give poor results or fail"
    )
    if limits.aspect_policy is CheckPolicy.ERROR:
        raise ImageError(
            text + "; to send it anyway use Limits(aspect_policy='warn')",
            index=index,
            source=source,
        )
    return text


def too_large(size: int | None, cap: int, limits: Limits, fit: bool) -> str:
    if fit:
        return f"is larger than {cap:,} bytes, the most fit mode reads"
    shown = f"is {size:,} bytes" if size is not None else "is larger than that"
    return f"{shown}; the limit is {limits.max_image_bytes:,} bytes (Limits.max_image_bytes)"

"""Optional ``fit`` mode: shrink an image that breaks the size or resolution limit.

Needs Pillow (``pip install 'dreamo_async[pillow]'``). It never crops and never
changes the aspect ratio: it scales down to fit the resolution limit, then
re-encodes as JPEG at falling quality (and, if needed, smaller scales) until
the file fits the byte limit. Images already within the limits pass untouched.
"""

from __future__ import annotations

import io

from ._imageheaders import HeaderError, read_dimensions, sniff_format
from .errors import ImageError
from .limits import Limits

__all__ = ["fit_image"]


def fit_image(
    data: bytes | memoryview, *, index: int, source: str, limits: Limits
) -> bytes | memoryview:
    """Return ``data`` itself when it fits, else a downscaled / re-encoded JPEG."""
    kind = sniff_format(bytes(data[:512]))
    if kind in ("JPEG", "PNG") and len(data) <= limits.max_image_bytes:
        try:
            width, height = read_dimensions(data, kind)
        except HeaderError:
            return data  # inspect_image reports it
        if width <= limits.max_image_width and height <= limits.max_image_height:
            return data
    try:
        from PIL import Image
    except ImportError:
        raise ImageError(
            f"image {index} ({source}) needs fitting, which needs Pillow: "
            "pip install 'dreamo_async[pillow]'",
            index=index,
            source=source,
        ) from None
    try:
        with Image.open(io.BytesIO(bytes(data))) as opened:
            image = opened.convert("RGB")
    except Exception as exc:
        raise ImageError(
            f"image {index} ({source}) cannot be decoded: {exc}", index=index, source=source
        ) from None
    scale = min(1.0, limits.max_image_width / image.width, limits.max_image_height / image.height)
    for _ in range(8):
        size = (max(1, int(image.width * scale)), max(1, int(image.height * scale)))
        resized = image if size == image.size else image.resize(size, Image.Resampling.LANCZOS)
        for quality in (92, 85, 75, 65):
            out = io.BytesIO()
            resized.save(out, "JPEG", quality=quality, optimize=True)
            if out.tell() <= limits.max_image_bytes:
                return out.getvalue()
        scale *= 0.8
    raise ImageError(
        f"image {index} ({source}) could not be fitted under {limits.max_image_bytes:,} bytes",
        index=index,
        source=source,
    )

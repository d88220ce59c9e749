"""The image stage: from what users pass in ``images=[...]`` to what the service accepts.

One concern per module, in the order a job meets them:

* :mod:`.classify`: what each input is, from its Python type (no I/O), when the
  request is built. A ``str`` is never a local file.
* :mod:`.headers`: format sniffing and header dimensions (pure).
* :mod:`.checks`: size, resolution and aspect ratio against the limits (pure).
* :mod:`.read`: reading local inputs under a byte cap (blocking, worker thread).
* :mod:`.prepare`: the only async part: fetch URLs, hop to a worker thread, encode.
* :mod:`.fit`: the optional Pillow downscale of ``fit`` mode.
"""

from __future__ import annotations

from .checks import ImageInfo, inspect_image
from .classify import ImageInput, ImageSource, classify_images, path_or_url
from .headers import sniff_format
from .prepare import (
    FIT_MAX_BYTES,
    Fetch,
    PreparedImages,
    check_limiter,
    live_payload_count,
    prepare_images,
    prepare_inline,
    prepare_slow,
    stage_limiter,
    warm_up_stage,
)
from .read import check_local_image, check_paths_readable

__all__ = [
    "FIT_MAX_BYTES",
    "Fetch",
    "ImageInfo",
    "ImageInput",
    "ImageSource",
    "PreparedImages",
    "check_limiter",
    "check_local_image",
    "check_paths_readable",
    "classify_images",
    "inspect_image",
    "live_payload_count",
    "path_or_url",
    "prepare_images",
    "prepare_inline",
    "prepare_slow",
    "sniff_format",
    "stage_limiter",
    "warm_up_stage",
]

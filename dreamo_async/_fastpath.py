"""The shortcuts kept on the per-job path, each with what it buys, all in one place.

Each one is kept because it saves at least 1% of the client's instructions per tiny
job (``benchmarks/bench_instructions.py``), and each gives the same answer as the
plain code it stands in for (tests/test_hot_path.py compares them). None touches
another library's private state.

* :func:`encode_head` — the create head (model, flat params) written by hand from
  public ``json.encoder.encode_basestring``: ``JSONEncoder.encode`` builds a new C
  encoder at every call, which costs as much as the encoding; anything but flat
  scalars and lists of them goes to the encoder.
* :func:`plain_within` — an uncompressed answer within the cap is read in one call,
  without the capped reader's coroutine (every create and poll).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from json.encoder import encode_basestring
from typing import Any, Final

import aiohttp

__all__ = ["HEAD_ENCODER", "encode_head", "plain_within"]

#: The plain encoder, with the library's options: UTF-8 text, compact, no NaN.
HEAD_ENCODER: Final = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _scalar(value: object) -> str | None:
    """JSON of an exact str, bool, int, finite float or None; else None (not handled)."""
    kind = type(value)
    if kind is str:
        return encode_basestring(value)  # type: ignore[arg-type]
    if kind is bool:
        return "true" if value else "false"
    if kind is int:
        return int.__repr__(value)
    if kind is float and math.isfinite(value):  # type: ignore[arg-type]
        return float.__repr__(value)
    if value is None:
        return "null"
    return None


def encode_head(model: str, params: Mapping[str, Any]) -> str:
    """``HEAD_ENCODER.encode({"model": model, "input": [{"params": params}]})``, same text."""
    items: list[str] = []
    for key, value in params.items():
        text = _scalar(value)
        if text is None and type(value) is list:
            parts = [_scalar(item) for item in value]
            text = None if None in parts else "[" + ",".join(parts) + "]"  # type: ignore[arg-type]
        if text is None or type(key) is not str:
            return HEAD_ENCODER.encode({"model": model, "input": [{"params": params}]})
        items.append(encode_basestring(key) + ":" + text)
    return (
        '{"model":' + encode_basestring(model) + ',"input":[{"params":{' + ",".join(items) + "}}]}"
    )


def plain_within(response: aiohttp.ClientResponse, cap: int) -> bool:
    """An uncompressed answer whose ``Content-Length`` is within ``cap``."""
    declared = response.content_length
    return (
        declared is not None
        and declared <= cap
        and (
            "Content-Encoding" not in response.headers
            or response.headers["Content-Encoding"].strip().lower() in ("", "identity")
        )
    )

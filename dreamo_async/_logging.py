"""The library's loggers, and ``DREAMO_LOG``: turn them on without touching logging config.

Loggers (standard :mod:`logging`; the library adds no handler unless asked):

* ``dreamo_async`` — INFO when a task is created and when its end is seen; WARNING
  when a paid task is abandoned, a rate is learned, or a cost is unknown.
* ``dreamo_async.transport`` — DEBUG: one line per HTTP request (method, path,
  status, task id, elapsed; never a header, so never the key) and one per retry.

``DREAMO_LOG=debug`` (or ``info``, ``warning``...) in the environment, read once at
import, puts a stderr handler on the ``dreamo_async`` logger at that level.
"""

from __future__ import annotations

import logging
import os
from typing import Final

__all__ = ["LOGGER_NAME", "TRANSPORT_LOGGER_NAME", "configure_from_env"]

LOGGER_NAME: Final = "dreamo_async"
TRANSPORT_LOGGER_NAME: Final = "dreamo_async.transport"
#: The handler this module installed (so a second call does not add another).
_installed: logging.Handler | None = None


def configure_from_env(value: str | None = None) -> logging.Handler | None:
    """Install the ``DREAMO_LOG`` handler when the variable names a level; else nothing.

    An unknown level name is ignored (a typo must not break an import).
    """
    global _installed
    text = (os.environ.get("DREAMO_LOG", "") if value is None else value).strip().upper()
    level = logging.getLevelName(text) if text else None
    if not isinstance(level, int):
        return None
    logger = logging.getLogger(LOGGER_NAME)
    if _installed is not None:
        logger.removeHandler(_installed)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(level)
    logger.addHandler(handler)
    logger.setLevel(level)
    _installed = handler
    return handler


configure_from_env()

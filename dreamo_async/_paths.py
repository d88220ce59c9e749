"""File names from untrusted text (a result URL, a task id) that stay inside a folder.

Whatever a response says (``../../.ssh/authorized_keys``, ``/etc/passwd``,
``C:\\Windows\\x``, ``%2e%2e%2f``, a NUL byte, ``CON``), :func:`safe_output_path`
returns a path directly inside the chosen folder: the name is reduced to its last
component, stripped of separators, control characters and leading dots, cut to a
length every file system takes, and never ``.``/``..`` or a reserved Windows
device name. Writers should still open with ``O_NOFOLLOW`` (a symlink planted
in the folder is not followed) — see :func:`open_exclusive`.
"""

from __future__ import annotations

import os
import re
import unicodedata
from pathlib import Path
from typing import BinaryIO, Final
from urllib.parse import unquote

__all__ = ["open_exclusive", "safe_output_path"]

#: Most bytes of a file name (255 on common file systems, with room for a suffix).
MAX_NAME_BYTES: Final = 200
_UNSAFE: Final = re.compile(r"[\x00-\x1f\x7f/\\:*?\"<>|]+")
_RESERVED: Final = frozenset(
    {"CON", "PRN", "AUX", "NUL"} | {f"COM{i}" for i in range(10)} | {f"LPT{i}" for i in range(10)}
)


def safe_output_path(folder: str | os.PathLike[str], name: str, *, default: str = "file") -> Path:
    """``folder / <name made safe>``: always a direct child of ``folder``."""
    base = Path(folder)
    text = unquote(unquote(name))  # %252e%252e%252f decodes twice to ../
    text = unicodedata.normalize("NFC", text)
    text = re.split(r"[/\\]", text)[-1]  # the last component, for either separator
    text = _UNSAFE.sub("_", text).strip().lstrip(".").strip()
    if not text:
        text = default
    if text.split(".", 1)[0].upper() in _RESERVED:
        text = "_" + text
    encoded = text.encode("utf-8")
    if len(encoded) > MAX_NAME_BYTES:
        stem, dot, suffix = text.rpartition(".")
        keep = suffix if dot and len(suffix.encode()) <= 16 else ""
        room = MAX_NAME_BYTES - len(keep.encode()) - 1
        head = (stem if keep else text).encode("utf-8")[:room].decode("utf-8", "ignore")
        text = f"{head}.{keep}" if keep else head
    path = base / text
    if path.parent != base or path.name in ("", ".", ".."):  # belt and braces
        raise ValueError(f"refusing file name {name!r}")
    return path


def open_exclusive(path: Path) -> BinaryIO:
    """Create ``path`` for writing; fail if it exists, and never follow a symlink there."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    flags |= getattr(os, "O_BINARY", 0)
    return os.fdopen(os.open(path, flags, 0o644), "wb")

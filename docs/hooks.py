"""MkDocs hook: render the Sphinx roles of the docstrings (``:class:`X```) as plain code.

The docstrings are written for both ``help()`` and the docs; Markdown turns the
role's backticks into ``<code>`` and leaves the role name in front of it.
"""

from __future__ import annotations

import re
from typing import Any

#: ``:role:`~a.b.C``` shows ``C`` (Sphinx's ``~``); ``:role:`a.b.C``` shows ``a.b.C``.
_ROLE = re.compile(
    r":(?:class|func|meth|mod|attr|data|exc|obj):<code>(~[\w.]*\.)?([^<]*)</code>"
)


def on_page_content(html: str, **kwargs: Any) -> str:
    """Drop the role names; keep the code."""
    return _ROLE.sub(r"<code>\2</code>", html)

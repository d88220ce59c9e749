"""``NOT_GIVEN``: the "not given" default of public parameters where ``None`` already
means something (``timeout=None``: no deadline), as openai-python's ``NOT_GIVEN``."""

from __future__ import annotations

from typing import Final, Literal

__all__ = ["NOT_GIVEN", "NotGiven"]


class NotGiven:
    """The type of :data:`NOT_GIVEN`: compare with ``is NOT_GIVEN`` or ``isinstance``."""

    __slots__ = ()

    def __bool__(self) -> Literal[False]:
        return False

    def __repr__(self) -> str:
        return "NOT_GIVEN"


#: "Not given": the parameter takes its default (``timeout``: ``PollPolicy.timeout``).
NOT_GIVEN: Final = NotGiven()

"""One job's money state, moved forward by the client and the transport, read by everyone else.

A :class:`JobLifecycle` goes with a job from its call to its end. The transport says
when the create body may leave (:meth:`~JobLifecycle.sending`), when the service surely
made nothing (:meth:`~JobLifecycle.refused`), when a task exists
(:meth:`~JobLifecycle.created`) or when the answer was lost
(:meth:`~JobLifecycle.outcome_unknown`). Every error that leaves the job is stamped
with that state (:meth:`~JobLifecycle.stamp`), so callers, ``generate_many``, the batch
journal and the CLI decide from the state what to retry, resume or report.
"""

from __future__ import annotations

from .errors import DreamOError, MoneyState

__all__ = ["JobLifecycle"]


class JobLifecycle:
    """The money state of one job, with the ids that name what the service may hold."""

    __slots__ = ("request_id", "state", "task_id")

    def __init__(self) -> None:
        #: Where the job stands; only moves forward, except back from SENDING on a refusal.
        self.state = MoneyState.NOT_SENT
        #: The ``X-Request-Id`` of the create, once one may have left.
        self.request_id: str | None = None
        #: The task id, once the service answered with one.
        self.task_id: str | None = None

    def sending(self, request_id: str) -> None:
        """The create body may leave from now on: a crash now leaves the outcome unknown."""
        self.request_id = request_id
        self.state = MoneyState.SENDING

    def refused(self) -> None:
        """The service surely made no task (documented refusal, connection never made)."""
        if self.state is MoneyState.SENDING:
            self.state = MoneyState.NOT_SENT

    def outcome_unknown(self) -> None:
        """The body may have reached the service and its answer is lost or unreadable."""
        if self.state in (MoneyState.NOT_SENT, MoneyState.SENDING):
            self.state = MoneyState.OUTCOME_UNKNOWN

    def created(self, task_id: str) -> None:
        """The service answered with a task: it exists and is paid for."""
        self.task_id = task_id
        self.state = MoneyState.CREATED

    def ended(self, *, failed: bool) -> None:
        """The service reported the task's end."""
        self.state = MoneyState.FAILED if failed else MoneyState.COMPLETED

    @property
    def task_may_exist(self) -> bool:
        """A create may have reached the service (sent, unknown, or a task exists)."""
        return self.state is not MoneyState.NOT_SENT

    def stamp(self, error: BaseException) -> None:
        """Write this job's state and ids on ``error`` (a :class:`DreamOError`) as it leaves.

        An error raised while the body was being sent leaves the outcome unknown. Fields
        the error already names (a task id from a poll, say) are kept.
        """
        if not isinstance(error, DreamOError):
            return
        state = self.state
        if state is MoneyState.SENDING:
            state = MoneyState.OUTCOME_UNKNOWN
        if error.money_state is MoneyState.NOT_SENT or state is not MoneyState.NOT_SENT:
            error.money_state = state
        if error.task_id is None and self.task_id is not None:
            error.task_id = self.task_id
        if error.request_id is None and self.request_id is not None:
            error.request_id = self.request_id

    def __repr__(self) -> str:
        ids = "".join(
            f" {name}={value}"
            for name, value in (("task", self.task_id), ("request", self.request_id))
            if value
        )
        return f"<JobLifecycle {self.state.value}{ids}>"

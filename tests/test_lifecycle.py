"""The money state a job carries, and how it is written on the errors that leave the job."""

from __future__ import annotations

import pickle

import pytest

from dreamo_async import (
    CreateOutcomeUnknownError,
    MoneyState,
    RateLimitError,
    TaskFailedError,
    TaskTimeoutError,
)
from dreamo_async.lifecycle import JobLifecycle


def test_an_error_while_sending_leaves_the_outcome_unknown() -> None:
    job = JobLifecycle()
    job.sending("rid")
    error = RateLimitError("boom")
    job.stamp(error)
    assert error.money_state is MoneyState.OUTCOME_UNKNOWN
    assert error.request_id == "rid"
    assert error.unknown_task_possible
    assert not error.nothing_sent


def test_a_refusal_means_nothing_was_sent() -> None:
    job = JobLifecycle()
    job.sending("rid")
    job.refused()
    error = RateLimitError("slow down")
    job.stamp(error)
    assert error.money_state is MoneyState.NOT_SENT
    assert error.nothing_sent
    assert not error.unknown_task_possible


def test_an_unknown_outcome_is_never_downgraded_by_the_job() -> None:
    job = JobLifecycle()
    error = CreateOutcomeUnknownError("lost", request_id="rid")
    job.stamp(error)
    assert error.money_state is MoneyState.OUTCOME_UNKNOWN
    assert error.unknown_task_possible


def test_a_created_task_is_named_on_every_later_error() -> None:
    job = JobLifecycle()
    job.sending("rid")
    job.created("t1")
    error = TaskTimeoutError("t1", 1.0)
    job.stamp(error)
    assert error.money_state is MoneyState.CREATED
    assert (error.task_id, error.request_id) == ("t1", "rid")
    assert not error.unknown_task_possible
    assert not error.nothing_sent


@pytest.mark.parametrize(
    "error",
    [
        TaskFailedError("t1", "003013095", "boom"),
        TaskTimeoutError("t1", 2.0, "pending"),
        CreateOutcomeUnknownError("lost", request_id="rid"),
    ],
)
def test_the_money_state_survives_pickling(error: Exception) -> None:
    job = JobLifecycle()
    job.sending("rid")
    job.stamp(error)
    copy = pickle.loads(pickle.dumps(error))
    assert copy.money_state is error.money_state  # type: ignore[attr-defined]
    assert copy.request_id == "rid"
    assert str(copy) == str(error)

"""max_spend and spending(): the cap counted at the fake server's side, over real HTTP."""

from __future__ import annotations

import asyncio
import pickle
from collections.abc import AsyncIterator
from decimal import Decimal

import pytest

import dreamo_async as d
from dreamo_async.testing import FakeDreamOServer, Fault, make_png

from .helpers import KEY, client_for

PNG = make_png(32, 32)


@pytest.fixture
async def server() -> AsyncIterator[FakeDreamOServer]:
    async with FakeDreamOServer(api_key=KEY, task_duration_ms=20, cost_per_image="0.01") as fake:
        yield fake


def images(i: int) -> list[bytes]:
    return [PNG] * (1 + i % 5)


async def test_200_jobs_never_go_over_the_cap_and_use_most_of_it(
    server: FakeDreamOServer,
) -> None:
    cap = Decimal("2.00")  # the 200 jobs would cost 6.00
    async with client_for(server, max_concurrency=20, max_spend=cap) as client:
        outcomes = await asyncio.gather(
            *(client.generate(prompt=f"p{i}", images=images(i)) for i in range(200)),
            return_exceptions=True,
        )
        spending = client.spending()
    refused = [o for o in outcomes if isinstance(o, d.BudgetExceededError)]
    others = [o for o in outcomes if isinstance(o, BaseException) and o not in refused]
    assert not others
    assert refused
    assert all(e.nothing_sent for e in refused)
    billed = server.stats.cost_created
    assert billed <= cap
    assert billed >= cap * Decimal("0.8")
    assert spending.spent == billed
    assert spending.reserved == 0
    assert spending.in_flight == 0
    assert spending.completed == 200 - len(refused) == server.stats.creates
    assert client.statistics().spending == spending


async def test_the_first_task_is_a_probe_sent_alone(server: FakeDreamOServer) -> None:
    async with client_for(server, max_concurrency=8, max_spend="10") as client:
        await asyncio.gather(*(client.generate(prompt=f"p{i}", images=[PNG]) for i in range(8)))
    starts = sorted(t for t, method, _ in server.stats.request_times if method == "POST")
    # Nothing else was created before the probe ended (20 ms) and its cost was known.
    assert server.stats.creates == 8
    assert starts[1] - starts[0] >= 0.02
    assert server.stats.max_open_tasks > 1  # then the rest went together


async def test_expected_cost_skips_the_probe_and_a_task_without_cost_settles_at_it() -> None:
    async with FakeDreamOServer(api_key=KEY, task_duration_ms=50, cost=None) as server:
        client = client_for(
            server, max_concurrency=4, max_spend="1.00", expected_cost=lambda r: "0.25"
        )
        async with client:
            outcomes = await asyncio.gather(
                *(client.generate(prompt=f"p{i}", images=[PNG]) for i in range(6)),
                return_exceptions=True,
            )
            assert server.stats.max_open_tasks == 4  # no probe: all four at once
            spending = client.spending()
    assert sum(isinstance(o, d.BudgetExceededError) for o in outcomes) == 2
    assert spending.spent == spending.estimated == Decimal("1.00")


async def test_failed_tasks_count_at_their_estimate(server: FakeDreamOServer) -> None:
    server.fail_tasks(ratio=1.0)
    async with client_for(server, max_spend="0.05", expected_cost="0.02") as client:
        outcomes = await asyncio.gather(
            *(client.generate(prompt=f"p{i}", images=[PNG]) for i in range(4)),
            return_exceptions=True,
        )
        spending = client.spending()
    assert sum(isinstance(o, d.TaskFailedError) for o in outcomes) == 2
    assert sum(isinstance(o, d.BudgetExceededError) for o in outcomes) == 2
    assert (spending.spent, spending.failed) == (Decimal("0.04"), 2)


async def test_nothing_created_gives_the_reservation_back(server: FakeDreamOServer) -> None:
    server.inject("create", Fault.status(400, code="003013004"))  # a documented refusal
    async with client_for(server, max_spend="0.01", expected_cost="0.01") as client:
        with pytest.raises(d.APIError):
            await client.generate(prompt="refused", images=[PNG])
        assert client.spending().reserved == 0
        await client.generate(prompt="fits", images=[PNG])
        assert client.spending().spent == Decimal("0.01")


async def test_an_unknown_outcome_keeps_its_estimate(server: FakeDreamOServer) -> None:
    server.inject("create", Fault.create_then_500())
    async with client_for(server, max_spend="0.01", expected_cost="0.01") as client:
        with pytest.raises(d.CreateOutcomeUnknownError):
            await client.generate(prompt="lost answer", images=[PNG])
        with pytest.raises(d.BudgetExceededError, match="nothing was sent"):
            await client.generate(prompt="over", images=[PNG])
    assert server.stats.creates == 1


async def test_a_timed_out_task_stays_reserved_until_wait_sees_its_end(
    server: FakeDreamOServer,
) -> None:
    async with client_for(server, max_spend="0.05") as client:
        with pytest.raises(d.TaskTimeoutError) as info:
            await client.generate(prompt="slow [never]", images=[PNG], timeout=0.05)
        assert client.spending().in_flight == 1
        server.finish_task(info.value.task_id)
        await client.wait(info.value.task_id)
        assert client.spending() == d.Spending(
            cap=Decimal("0.05"),
            spent=Decimal("0.01"),
            reserved=Decimal(0),
            estimated=Decimal(0),
            completed=1,
            failed=0,
            in_flight=0,
        )


async def test_submit_then_wait_settles_the_task(server: FakeDreamOServer) -> None:
    async with client_for(server, max_spend="1") as client:
        task = await client.submit(prompt="p", images=[PNG, PNG])
        assert client.spending().in_flight == 1
        await client.wait(task)
        assert client.spending().spent == Decimal("0.02")


@pytest.mark.parametrize("bad", ["lots", -1, float("nan"), True, [1]])
def test_a_bad_cap_is_a_configuration_error_naming_it(bad: object) -> None:
    with pytest.raises(d.ConfigurationError, match="max_spend"):
        d.DreamOClient(api_key=KEY, max_spend=bad)  # type: ignore[arg-type]


def test_no_cap_counts_without_limiting() -> None:
    client = d.DreamOClient(api_key=KEY, max_spend=None)
    assert client.spending().cap is None
    assert client.spending().remaining is None


def test_the_error_pickles_with_its_figures() -> None:
    err = d.BudgetExceededError(
        cap=Decimal(1), spent=Decimal("0.9"), reserved=Decimal(0), estimate=Decimal("0.2")
    )
    back = pickle.loads(pickle.dumps(err))
    assert (back.cap, back.estimate, str(back)) == (err.cap, err.estimate, str(err))
    assert back.money_state is d.MoneyState.NOT_SENT


async def test_a_probe_whose_job_gave_up_holds_back_nothing(server: FakeDreamOServer) -> None:
    async with client_for(server, max_concurrency=2, max_spend="1") as client:
        with pytest.raises(d.TaskTimeoutError):
            await client.generate(prompt="slow [never]", images=[PNG], timeout=0.05)
        # The probe runs on (reserved until wait() sees its end) but blocks no one.
        result = await asyncio.wait_for(client.generate(prompt="next", images=[PNG]), 5)
        assert result.cost == Decimal("0.01")
        assert client.spending().in_flight == 1

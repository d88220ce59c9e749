"""RedisCoordinator against a real redis-server on a free loopback port (no mocks of Redis).

Several ``RedisCoordinator`` objects in one test stand for several processes (each has
its own connections; Redis cannot tell them apart); the multi-process test runs
real worker processes, one of them SIGKILLed mid-run.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

import dreamo_async as d
from dreamo_async.testing import FakeDreamOServer, Fault, make_png, max_in_window

from .conftest import eventually
from .redis_server import RedisServer, free_port

pytestmark = pytest.mark.redis

IMAGE = make_png(64, 64)
WORKER = Path(__file__).with_name("redis_worker.py")
ROOT = WORKER.parent.parent


async def redis_time_ms(client: aioredis.Redis) -> float:
    seconds, micros = await client.time()
    return seconds * 1000 + micros / 1000


# --------------------------------------------------------------------------- rate


async def test_rate_window_holds_across_clients(redis_server: RedisServer) -> None:
    rate, burst, per_client = 100.0, 5, 50
    backends = [d.RedisCoordinator(redis_server.url, key="rate") for _ in range(3)]
    limiters = [b.make_limiter(rate, burst) for b in backends]
    loop = asyncio.get_running_loop()
    grants: list[float] = []
    started = loop.time()

    async def take(limiter: d.RateLimiter) -> None:
        for _ in range(per_client):
            await limiter.acquire()
            grants.append(loop.time())

    await asyncio.gather(*(take(limiter) for limiter in limiters))
    for backend in backends:
        await backend.aclose()
    total = 3 * per_client
    assert len(grants) == total
    assert max_in_window(grants) <= rate + burst
    # The three shared one budget: alone, each would have finished in (50 - 5) / 100 s.
    assert max(grants) - started >= (total - burst) / rate * 0.95
    # The state starts empty: the first `burst` grants did not wait for one interval each.
    assert sorted(grants)[burst - 1] - started < (burst - 1) / rate + 0.5


async def test_a_429_in_one_process_pauses_all(redis_server: RedisServer) -> None:
    async with FakeDreamOServer(task_duration_ms=10) as server:
        server.inject("create", Fault.status(429, retry_after=0.4))
        poll = d.PollPolicy(initial_delay=0.01, max_delay=0.01, use_progress=False)
        clients = [
            d.DreamOClient(
                api_key="test-key",
                base_url=server.url,
                poll=poll,
                coordinator=d.RedisCoordinator(redis_server.url, key="pause"),
            )
            for _ in range(2)
        ]
        async with clients[0] as first, clients[1] as second:
            job = asyncio.create_task(first.generate(prompt="a", images=[IMAGE]))
            await eventually(lambda: server.stats.rate_limited == 1)
            await asyncio.sleep(0.05)  # let the first process write the pause to Redis
            await second.generate(prompt="b", images=[IMAGE])
            await job
        refused_at = server.stats.request_times[0][0]
        later = [moment for moment, _, _ in server.stats.request_times[1:]]
        assert server.stats.creates == 2
        # Nothing of either process reached the service before Retry-After had passed.
        assert min(later) - refused_at >= 0.39


async def test_unlimited_rate_still_shares_the_pause(redis_server: RedisServer) -> None:
    one = d.RedisCoordinator(redis_server.url, key="p2")
    first = one.make_limiter(None, 1)
    other = d.RedisCoordinator(redis_server.url, key="p2")
    second = other.make_limiter(None, 1)
    await second.acquire()  # connected, no wait
    first.pause(0.3)
    await asyncio.sleep(0.05)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await second.acquire()
    assert loop.time() - started >= 0.2
    assert repr(second).startswith("<RedisRateLimiter dreamo:{p2}:rate unlimited")
    await one.aclose()
    await other.aclose()


async def test_queued_requests_share_one_call_while_the_bucket_has_credit(
    redis_server: RedisServer,
) -> None:
    backend = d.RedisCoordinator(redis_server.url, key="batch")
    limiter = backend.make_limiter(10, 8)
    loop = asyncio.get_running_loop()
    grants: list[float] = []

    async def take() -> None:
        await limiter.acquire()
        grants.append(loop.time())

    await asyncio.gather(*(take() for _ in range(12)))
    # 8 at once (the burst), then one each 0.1 s: the bucket is never overdrawn ...
    assert max_in_window(grants, 0.35) <= 8 + 3
    assert sorted(grants)[-1] - sorted(grants)[0] >= 0.35
    # ... and the queued callers took their turns in a few calls, not one call each.
    assert backend.round_trips <= 2 + 4
    await backend.aclose()


async def test_polls_take_their_turn_before_creates(redis_server: RedisServer) -> None:
    backend = d.RedisCoordinator(redis_server.url, key="prio")
    limiter = backend.make_limiter(20, 1)
    await limiter.acquire()  # the next turn is 50 ms away: the others queue
    order: list[str] = []

    async def take(name: str, priority: d.Priority) -> None:
        await limiter.acquire(priority)
        order.append(name)

    first = asyncio.create_task(take("create-1", d.Priority.CREATE))
    await asyncio.sleep(0.01)  # create-1 holds the turn, sleeping in it
    tasks = [first]
    for name, priority in [
        ("create-2", d.Priority.CREATE),
        ("poll-1", d.Priority.POLL),
        ("create-3", d.Priority.CREATE),
        ("poll-2", d.Priority.POLL),
    ]:
        tasks.append(asyncio.create_task(take(name, priority)))
    cancelled = asyncio.create_task(take("poll-cancelled", d.Priority.POLL))
    await asyncio.sleep(0)
    cancelled.cancel()
    await asyncio.gather(*tasks)
    assert order == ["create-1", "poll-1", "poll-2", "create-2", "create-3"]
    await backend.aclose()


# --------------------------------------------------------------------------- slots


async def test_slots_are_shared_and_fifo_within_a_process(
    redis_server: RedisServer, inspect: aioredis.Redis
) -> None:
    backend = d.RedisCoordinator(redis_server.url, key="fifo")
    slots = backend.make_slots(1)
    held = await slots.acquire()
    order: list[int] = []

    async def waiter(i: int) -> None:
        token = await slots.acquire()
        order.append(i)
        await asyncio.sleep(0.005)
        await slots.release(token)

    tasks = []
    for i in range(5):
        tasks.append(asyncio.create_task(waiter(i)))
        await asyncio.sleep(0.01)
    assert slots.waiting == 5
    assert slots.in_use == 1
    assert await inspect.zcard("dreamo:{fifo}:slots") == 1
    await slots.release(held)
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3, 4]
    assert slots.in_use == 0
    assert await inspect.zcard("dreamo:{fifo}:slots") == 0
    await backend.aclose()


async def test_release_wakes_the_longest_waiting_process_without_polling(
    redis_server: RedisServer, inspect: aioredis.Redis
) -> None:
    a, b, c = (d.RedisCoordinator(redis_server.url, key="wake") for _ in range(3))
    slots_a, slots_b, slots_c = a.make_slots(1), b.make_slots(1), c.make_slots(1)
    held = await slots_a.acquire()

    async def blocked() -> int:
        info = await inspect.info("clients")
        return int(info["blocked_clients"])

    got_b = asyncio.create_task(slots_b.acquire())
    for _ in range(500):
        if await blocked() == 1:
            break
        await asyncio.sleep(0.002)
    got_c = asyncio.create_task(slots_c.acquire())
    for _ in range(500):
        if await blocked() == 2:
            break
        await asyncio.sleep(0.002)
    assert await blocked() == 2
    trips_before = b.round_trips + c.round_trips
    await asyncio.sleep(0.3)
    # Waiting costs nothing while nothing happens (BLPOP, not a loop of calls).
    assert b.round_trips + c.round_trips - trips_before <= 2
    loop = asyncio.get_running_loop()
    released = loop.time()
    await slots_a.release(held)
    token_b = await asyncio.wait_for(got_b, 5)
    # Woken by the release itself, well before the waiter's own 1-s BLPOP timeout.
    assert loop.time() - released < 0.5
    assert not got_c.done()
    await slots_b.release(token_b)
    await slots_c.release(await asyncio.wait_for(got_c, 5))
    for backend in (a, b, c):
        await backend.aclose()


_HOLDER = """
import asyncio, sys
import dreamo_async as d

async def main():
    slots = d.RedisCoordinator(sys.argv[1], key="dead", lease_ttl=float(sys.argv[2])).make_slots(2)
    await slots.acquire()
    await slots.acquire()
    print("HELD", flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


async def test_slots_of_a_killed_process_come_back_within_the_ttl(
    redis_server: RedisServer, inspect: aioredis.Redis
) -> None:
    ttl = 1.0
    holder = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _HOLDER, redis_server.url, str(ttl), stdout=asyncio.subprocess.PIPE
    )
    assert holder.stdout is not None
    try:
        assert await asyncio.wait_for(holder.stdout.readline(), 15) == b"HELD\n"
        backend = d.RedisCoordinator(redis_server.url, key="dead", lease_ttl=ttl)
        slots = backend.make_slots(2)
        waiting = asyncio.create_task(slots.acquire())
        await asyncio.sleep(ttl * 1.2)  # the holder's renewals keep its leases alive
        assert not waiting.done()
        leases = await inspect.zrange("dreamo:{dead}:slots", 0, -1)
        assert len(leases) == 2
        assert all(f":{holder.pid}:" in lease for lease in leases)
        trips = backend.round_trips
        holder.send_signal(signal.SIGKILL)
        await holder.wait()
        loop = asyncio.get_running_loop()
        killed = loop.time()
        token = await asyncio.wait_for(waiting, ttl + 2)
        assert loop.time() - killed <= ttl + 0.25
        # A handful of round trips while waiting: one BLPOP per lease expiry or second.
        assert backend.round_trips - trips <= 6
        remaining = await inspect.zrange("dreamo:{dead}:slots", 0, -1)
        assert remaining == [f"{backend.owner}:1"]
        await slots.release(token)
        await backend.aclose()
    finally:
        if holder.returncode is None:
            holder.kill()
            await holder.wait()


# --------------------------------------------------------------------------- outages


async def test_redis_down_fails_closed_with_the_url_and_no_secret() -> None:
    port = free_port()
    backend = d.RedisCoordinator(f"redis://:s3cret@127.0.0.1:{port}/0", key="down")
    assert "s3cret" not in repr(backend)
    async with FakeDreamOServer() as server:
        async with d.DreamOClient(
            api_key="test-key", base_url=server.url, coordinator=backend
        ) as client:
            with pytest.raises(d.LimitsBackendError) as caught:
                await client.generate(prompt="p", images=[IMAGE])
        assert server.stats.requests == 0  # fail closed: nothing was sent
    message = str(caught.value)
    assert f"127.0.0.1:{port}" in message
    assert "s3cret" not in message
    with pytest.raises(d.LimitsBackendError, match=f"127.0.0.1:{port}"):
        await d.RedisCoordinator(f"redis://127.0.0.1:{port}/0").ping()


async def test_a_password_in_the_query_or_user_info_is_never_shown() -> None:
    # redis-py also reads the password from `?password=`: the shown URL drops the query.
    port = free_port()
    backend = d.RedisCoordinator(f"redis://127.0.0.1:{port}/0?password=s3cret", key="query")
    assert backend.url == f"redis://127.0.0.1:{port}/0"
    assert "s3cret" not in repr(backend)
    with pytest.raises(d.LimitsBackendError) as caught:
        await backend.ping()
    assert f"127.0.0.1:{port}" in str(caught.value)
    assert "s3cret" not in str(caught.value)
    # An IPv6 host keeps its brackets; user name and password both go.
    ipv6 = d.RedisCoordinator("redis://admin:s3cret@[::1]:6379/0")
    assert ipv6.url == "redis://[::1]:6379/0"
    assert "s3cret" not in repr(ipv6)


async def test_fallback_local_warns_once_and_keeps_working() -> None:
    backend = d.RedisCoordinator(f"redis://127.0.0.1:{free_port()}/0", key="x", fallback="local")
    async with FakeDreamOServer(task_duration_ms=5) as server:
        poll = d.PollPolicy(initial_delay=0.01, max_delay=0.01, use_progress=False)
        async with d.DreamOClient(
            api_key="test-key",
            base_url=server.url,
            max_concurrency=2,
            requests_per_second=200,
            poll=poll,
            coordinator=backend,
        ) as client:
            with pytest.warns(d.DreamOWarning, match="in-process limits") as caught:
                results = await asyncio.gather(
                    *(client.generate(prompt=f"p{i}", images=[IMAGE]) for i in range(6))
                )
        assert len(results) == 6
        assert len(caught) == 1
        assert server.stats.max_open_tasks <= 2  # the local pool still held


async def test_an_outage_longer_than_the_grace_fails_closed_then_recovers(
    redis_server: RedisServer,
) -> None:
    backend = d.RedisCoordinator(redis_server.url, key="grace", reconnect_timeout=0.3)
    limiter = backend.make_limiter(1000, 1)
    await limiter.acquire()
    redis_server.stop()
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(d.LimitsBackendError, match="unavailable"):
        await limiter.acquire()
    assert loop.time() - started >= 0.3  # the grace for a restart was granted first
    redis_server.start()
    await limiter.acquire()  # back without a new backend
    await backend.aclose()


async def test_a_redis_restart_is_survived(
    redis_server: RedisServer, inspect: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    ttl = 0.6
    backend = d.RedisCoordinator(
        redis_server.url, key="restart", lease_ttl=ttl, reconnect_timeout=10
    )
    slots = backend.make_slots(3)
    held = [await slots.acquire(), await slots.acquire()]
    async with FakeDreamOServer(task_duration_ms=20) as server:
        poll = d.PollPolicy(initial_delay=0.02, max_delay=0.02, use_progress=False)
        async with d.DreamOClient(
            api_key="test-key",
            base_url=server.url,
            max_concurrency=3,
            requests_per_second=300,
            burst=3,
            poll=poll,
            coordinator=backend,
        ) as client:
            # The client's own slots are a second pool on the same key: 3 in all, 2 held.
            done = 0

            async def jobs() -> None:
                nonlocal done
                for i in range(12):
                    await client.generate(prompt=f"r{i}", images=[IMAGE])
                    done += 1

            run = asyncio.create_task(jobs())
            await eventually(lambda: done >= 3)
            with caplog.at_level(logging.WARNING, logger="dreamo_async"):
                await asyncio.to_thread(redis_server.restart, 0.2)
                await run
                # Renewal re-creates the leases the restart wiped (scripts re-sent too).
                await eventually(lambda: "were re-created" in caplog.text, timeout=ttl * 2)
            owned = await inspect.zrange("dreamo:{restart}:slots", 0, -1)
            assert sorted(owned) == [f"{backend.owner}:1", f"{backend.owner}:2"]
            for token in held:
                await slots.release(token)
        assert done == 12
        assert server.stats.creates == 12
    stats = await inspect.info("commandstats")
    assert stats["cmdstat_script|load"]["calls"] >= 1  # NOSCRIPT answered by re-sending


# --------------------------------------------------------------------------- processes


async def _start(*args: str, env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, *args, stdout=asyncio.subprocess.PIPE, env=env
    )


@pytest.mark.slow
async def test_four_processes_share_one_budget_and_survive_a_sigkill(
    redis_server: RedisServer, inspect: aioredis.Redis
) -> None:
    total, concurrency, rate, burst, ttl = 200, 6, 100.0, 5, 1.0
    fake = await _start("-m", "dreamo_async.testing", "--port", "0", "--task-duration-ms", "30")
    workers: list[asyncio.subprocess.Process] = []
    try:
        # A bound well inside pytest's timeout, so a stuck worker fails the test cleanly.
        async with asyncio.timeout(90):
            assert fake.stdout is not None
            ready = (await asyncio.wait_for(fake.stdout.readline(), 15)).decode().split()
            base_url = ready[1]
            await inspect.rpush("mp:jobs", *range(total))
            worker_args = [
                *("--base-url", base_url, "--redis-url", redis_server.url),
                *("--queue", redis_server.url, "--key", "mp", "--total", str(total)),
                *("--max-concurrency", str(concurrency), "--rate", str(rate)),
                *("--burst", str(burst), "--lease-ttl", str(ttl), "--poll-s", "0.035"),
            ]
            for _ in range(4):
                workers.append(await _start(str(WORKER), *worker_args))
            started: list[set[str]] = [set() for _ in workers]
            finished: list[set[str]] = [set() for _ in workers]

            async def follow(i: int) -> None:
                stream = workers[i].stdout
                assert stream is not None
                async for raw in stream:
                    kind, _, job = raw.decode().strip().partition(" ")
                    if kind == "START":
                        started[i].add(job)
                    elif kind == "DONE":
                        finished[i].add(job)

            readers = [asyncio.create_task(follow(i)) for i in range(len(workers))]
            peak_leases = 0

            async def watch_leases() -> None:
                nonlocal peak_leases
                while True:
                    peak_leases = max(peak_leases, await inspect.zcard("dreamo:{mp}:slots"))
                    await asyncio.sleep(0.005)

            watcher = asyncio.create_task(watch_leases())
            victim = workers[3]

            async def victim_leases() -> list[str]:
                leases = await inspect.zrange("dreamo:{mp}:slots", 0, -1)
                return [str(lease) for lease in leases if f":{victim.pid}:" in str(lease)]

            await eventually(lambda: sum(map(len, finished)) >= 40, timeout=30)
            for _ in range(10_000):  # kill it while it holds slots
                if await victim_leases():
                    break
                await asyncio.sleep(0.001)
            victim.send_signal(signal.SIGKILL)
            await victim.wait()
            loop = asyncio.get_running_loop()
            killed = loop.time()
            held_at_death = await victim_leases()
            assert held_at_death  # it died holding slots
            await readers[3]
            taken = set(await inspect.lrange(f"mp:taken:{victim.pid}", 0, -1))
            lost = taken - set(await inspect.smembers("mp:done"))
            assert lost  # ... and jobs

            async def victim_gone() -> bool:
                now = await redis_time_ms(inspect)
                for lease in held_at_death:
                    score = await inspect.zscore("dreamo:{mp}:slots", lease)
                    if score is not None and score > now:
                        return False
                return True

            while not await victim_gone():
                assert loop.time() - killed <= ttl + 0.2, "the dead worker's slots did not expire"
                await asyncio.sleep(0.01)
            await inspect.rpush("mp:jobs", *lost)  # its unfinished jobs go back to the queue
            for worker in workers[:3]:
                assert await asyncio.wait_for(worker.wait(), 60) == 0
            await asyncio.gather(*readers)
            watcher.cancel()
            assert await inspect.scard("mp:done") == total
            assert set().union(*finished) == {str(i) for i in range(total)}
            async with (
                aiohttp.ClientSession() as http,
                http.get(base_url + "/_fake/stats") as answer,
            ):
                stats: dict[str, Any] = json.loads(await answer.text())
            print({k: stats[k] for k in ("max_open_tasks", "max_requests_in_1s", "creates")})
            # What the service saw, from its side: the global limits held.
            assert stats["refused_total"] == 0
            assert 2 <= stats["max_open_tasks"] <= concurrency
            assert stats["max_requests_in_1s"] <= rate + burst
            assert stats["max_requests_in_1s"] >= rate * 0.8  # the rate limit was binding
            assert peak_leases <= concurrency
            by_prompt = stats["creates_by_prompt"]
            assert all(by_prompt.get(f"job {i}", 0) >= 1 for i in range(total))
            assert total <= stats["creates"] <= total + len(lost)
    finally:
        for process in [*workers, fake]:
            if process.returncode is None:
                process.kill()
                await process.wait()


def test_hostnames_in_lease_ids() -> None:
    # The owner tag names host and pid, so `ZRANGE` in Redis shows who holds what.
    backend = d.RedisCoordinator(key="names")
    assert backend.owner.startswith(f"{socket.gethostname()}:{os.getpid()}:")
    assert backend.url == "redis://127.0.0.1:6379/0"
    with pytest.raises(ValueError, match="fallback"):
        d.RedisCoordinator(fallback="maybe")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="braces"):
        d.RedisCoordinator(key="a{b}")
    with pytest.raises(d.ConfigurationError, match="fixed requests_per_second"):
        backend.make_limiter("auto", 1)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- the example


@pytest.mark.slow
async def test_example_app_workers_share_one_budget(redis_server: RedisServer) -> None:
    port = free_port()
    async with FakeDreamOServer(task_duration_ms=150) as server:
        env = {
            **os.environ,
            "DREAMO_BASE_URL": server.url,
            "DREAMO_API_KEY": "test-key",
            "REDIS_URL": redis_server.url,
            "DREAMO_LIMITS_KEY": "example",
            "DREAMO_MAX_CONCURRENCY": "2",
            "DREAMO_RATE": "200",
            "DREAMO_BURST": "5",
        }
        app = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "uvicorn", "examples.redis_app:app", "--workers", "2"),
            *("--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"),
            cwd=ROOT,
            env=env,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            async with aiohttp.ClientSession() as http:
                async with asyncio.timeout(30):
                    while True:
                        try:
                            async with http.get(url + "/stats") as answer:
                                if answer.status == 200:
                                    break
                        except aiohttp.ClientConnectionError:
                            pass
                        await asyncio.sleep(0.05)
                image = "data:image/png;base64," + base64.b64encode(IMAGE).decode()

                async def call(i: int) -> dict[str, Any]:
                    await asyncio.sleep(i * 0.03)  # staggered: both workers get some
                    body = {"prompt": f"example {i}", "images": [image]}
                    headers = {"Connection": "close"}
                    async with http.post(url + "/generate", json=body, headers=headers) as answer:
                        assert answer.status == 200, await answer.text()
                        return dict(await answer.json())

                answers = await asyncio.wait_for(asyncio.gather(*(call(i) for i in range(8))), 30)
        finally:
            app.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(app.wait(), 10)
            except TimeoutError:
                app.kill()
                await app.wait()
        print("answered by workers", sorted({a["worker"] for a in answers}))
        assert len({a["task_id"] for a in answers}) == 8
        assert server.stats.creates == 8
        # Two workers, each with max_concurrency=2, and yet at most 2 tasks at once.
        assert server.stats.max_open_tasks == 2


def test_without_the_redis_package_the_error_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # `import dreamo_async` never needs redis; only building a RedisCoordinator does.
    monkeypatch.setitem(sys.modules, "redis", None)
    monkeypatch.setitem(sys.modules, "redis.asyncio", None)
    with pytest.raises(d.ConfigurationError, match=r"pip install 'dreamo_async\[redis\]'"):
        d.RedisCoordinator()

"""Event-loop lag with full-size jobs, seen from outside (issue 14): a script, not a test.

Run from the repository root::

    .venv/bin/python benchmarks/bench_looplag.py             # 3 runs of each scenario
    .venv/bin/python benchmarks/bench_looplag.py --runs 5

Every measurement runs in a fresh child process (the interpreter running this script),
with the fake service in another process (``python -m dreamo_async.testing``), so
neither the server's CPU nor an earlier run's warm caches count. A 1 ms ticker on the
measured loop records how late each tick fires; the same ticker on the same loop,
idle, is the baseline: observed for as long as the work took (1 s before it, the
rest after), since the worst of more ticks is larger on a host that takes the CPU
away now and then (the hypervisor's steal time of the client's CPUs is printed for
both windows). Scenarios:

* ``batch``: 24 jobs of 5 JPEGs of ~1.9 MB each, read from disk (``images=[Path, ...]``),
  ``max_concurrency=4``, one ``asyncio.gather``.
* ``web``: an aiohttp.web app sharing one client (entered in its ``cleanup_ctx``); 50
  concurrent callers (in this process) POST to it and each handler generates with the
  same five files; the ticker runs in the app's loop.
* ``first``: the first ``generate()`` of a fresh process, client just entered (the time
  ``async with`` took is printed too: the start-up cost moved there).

Figures are medians over the runs of each run's worst and 99th-percentile lag. One more
run of each scenario in asyncio's debug mode (``slow_callback_duration`` = 2 ms) names
the callbacks that took longer; debug mode slows everything, so its lags are not used.

CPUs (Linux, 2 or more): the fake service and the web scenario's callers stand for other
machines, so they run on the last CPU and the measured process on the others (on a
2-core machine: the client has one core, its event loop sharing it with the library's
worker thread, like a client in a 1-CPU container). Unpinned (``--no-pin``), the
service's parsing of 12.5 MB bodies lands on the loop's core and the loop waits for it,
which no client can prevent and the idle baseline (service idle) does not include.

Each late tick (over 3 ms) is split from the loop thread's own counters: its CPU time
(callbacks), its run-queue wait (runnable, no CPU given: ``/proc/.../schedstat``), and
the rest, off CPU while it should have run (waiting for the GIL, or blocked). The
table counts late ticks by their largest part.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._common import (  # noqa: E402
    KEY,
    fake_server_process,
    photo_like_jpeg,
    print_table,
)

TARGET_BYTES = 1_900_000
CACHE = Path(tempfile.gettempdir()) / "dreamo_async_bench"
TICK_S = 0.001
IDLE_S = 1.0
SLOW_S = 0.002
CPU_NOTE_S = 0.001
LATE_S = 0.003
APP_ALONE_S = 0.5
GC_FREEZE_ENV = "DREAMO_BENCH_GC_FREEZE"
PROMPT = "the cat from image 1 wearing the hat from image 2, studio light"
SCENARIOS = ("batch", "web", "first")
#: The CPUs of the measured processes (None: unpinned); set by main().
CLIENT_CPUS: set[int] | None = None


# -- inputs ----------------------------------------------------------------------------


def looplag_jpegs(count: int = 5) -> list[Path]:
    """``count`` distinct ~1.9 MB photo-like JPEGs (2400 x 1800), made once and cached."""
    CACHE.mkdir(exist_ok=True)
    paths = []
    for seed in range(count):
        path = CACHE / f"looplag_{seed}_v1.jpg"
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(_make_jpeg(seed))
            tmp.replace(path)
        paths.append(path)
    return paths


def _make_jpeg(seed: int) -> bytes:
    """Noisy gradients, the quality searched to land just under ``TARGET_BYTES``."""
    return photo_like_jpeg(seed, 2400, 1800, max_bytes=TARGET_BYTES, noise=0.3, max_quality=100)


# -- measuring (child side) ------------------------------------------------------------


def _steal_ms() -> float:
    """Milliseconds the hypervisor ran something else on this process's CPUs (steal time
    in ``/proc/stat``, 10 ms resolution; Linux), else 0: ticks late for that reason are
    no program's doing."""
    try:
        cpus = {f"cpu{n}" for n in os.sched_getaffinity(0)}
        with open("/proc/stat", encoding="ascii") as f:
            jiffies = sum(int(line.split()[8]) for line in f if line.split()[0] in cpus)
    except (OSError, AttributeError, IndexError, ValueError):
        return 0.0
    return jiffies * 1000 / os.sysconf("SC_CLK_TCK")


def merge_idle(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """One idle baseline from the windows before and after the work (worst of both)."""
    worse = before if before["worst"] >= after["worst"] else after
    return worse | {
        "p99": max(before["p99"], after["p99"]),
        "ticks": before["ticks"] + after["ticks"],
        "late": {k: before["late"][k] + after["late"][k] for k in before["late"]},
        "steal": before["steal"] + after["steal"],
        "cpu": max(before["cpu"], after["cpu"]),
    }


def _run_queue_wait() -> float:
    """Seconds the calling thread has spent runnable but waiting for a CPU (Linux), else 0."""
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/schedstat", "rb") as f:
            return int(f.read().split()[1]) / 1e9
    except OSError:
        return 0.0


class Ticker:
    """A task that sleeps 1 ms at a time and records how late each wake-up is, and for
    each late one what the loop thread did meanwhile (see the module docstring)."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self.late: dict[str, int] = {"cpu": 0, "run queue": 0, "off cpu": 0}
        self.worst_parts: tuple[float, float, float] = (0.0, 0.0, 0.0)
        self._worst = 0.0
        self._steal = _steal_ms()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            before, cpu, queued = time.perf_counter(), time.thread_time(), _run_queue_wait()
            await asyncio.sleep(TICK_S)
            after = time.perf_counter()
            lag = after - before - TICK_S
            self.samples.append(lag)
            if lag > LATE_S:
                cpu, queued = time.thread_time() - cpu, _run_queue_wait() - queued
                parts = {"cpu": cpu, "run queue": queued, "off cpu": after - before - cpu - queued}
                self.late[max(parts, key=parts.__getitem__)] += 1
                if lag > self._worst:
                    self._worst, self.worst_parts = lag, (cpu, queued, parts["off cpu"])

    def take(self) -> dict[str, Any]:
        """Worst and p99 lag (ms) since the last take, the late ticks by cause, and the
        worst tick's parts (ms); and start afresh."""
        samples, self.samples = self.samples, []
        late, self.late = self.late, dict.fromkeys(self.late, 0)
        parts, self.worst_parts, self._worst = self.worst_parts, (0.0, 0.0, 0.0), 0.0
        steal, self._steal = _steal_ms() - self._steal, _steal_ms()
        return summary(samples) | {
            "late": late,
            "worst_parts": [p * 1e3 for p in parts],
            "steal": steal,
        }

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def summary(samples: Sequence[float]) -> dict[str, float]:
    ordered = sorted(samples) or [0.0]
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return {"worst": ordered[-1] * 1e3, "p99": p99 * 1e3, "ticks": len(ordered)}


class SlowCallbacks(logging.Handler):
    """Collects asyncio's debug-mode "Executing <handle> took N seconds" records."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen: list[tuple[str, float]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg.startswith("Executing") and len(record.args or ()) == 2:
            handle, seconds = record.args  # type: ignore[misc]
            self.seen.append((callback_name(str(handle)), float(seconds) * 1e3))  # type: ignore[arg-type]


def callback_name(text: str) -> str:
    """``<Task ... coro=<ClientRequest.write_bytes() ...>`` -> ``ClientRequest.write_bytes``."""
    for pattern in (r"coro=<([\w.<>]+)\(", r"Handle ([\w.<>]+)\(", r"<(\w+) "):
        match = re.search(pattern, text)
        if match:
            return match.group(1)
    return text[:60]


class CallbackClock:
    """The loop thread's CPU time per callback: what the loop itself spends, which other
    load on the machine does not change (the lag includes time the OS ran others).

    Wraps ``asyncio.events.Handle._run`` for the measurement only (tasks' steps run
    as handles too).
    """

    def __init__(self) -> None:
        self.max_cpu = 0.0
        self.seen: list[tuple[str, float]] = []

    def __enter__(self) -> CallbackClock:
        original = self._original = asyncio.events.Handle._run

        def timed(handle: asyncio.Handle) -> None:
            start = time.thread_time()
            original(handle)
            spent = time.thread_time() - start
            self.max_cpu = max(self.max_cpu, spent)
            if spent > CPU_NOTE_S:
                self.seen.append((_handle_name(handle), spent * 1e3))

        asyncio.events.Handle._run = timed  # type: ignore[method-assign, assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.events.Handle._run = self._original  # type: ignore[method-assign]

    def take(self) -> float:
        """Most CPU (ms) one callback took since the last take."""
        worst, self.max_cpu = self.max_cpu, 0.0
        return worst * 1e3


def _handle_name(handle: asyncio.Handle) -> str:
    """The callback's name. Not from ``repr(handle)``: that shows the arguments, and the
    result a worker thread hands back holds megabytes of base64 (a 60 ms repr)."""
    callback = getattr(handle, "_callback", None)
    owner = getattr(callback, "__self__", None)
    if isinstance(owner, asyncio.Task):
        return getattr(owner.get_coro(), "__qualname__", "task")
    return getattr(callback, "__qualname__", type(handle).__name__)


@contextlib.contextmanager
def watching_slow_callbacks(debug: bool) -> Iterator[SlowCallbacks]:
    handler = SlowCallbacks()
    log = logging.getLogger("asyncio")
    if debug:
        loop = asyncio.get_running_loop()
        loop.set_debug(True)
        loop.slow_callback_duration = SLOW_S
        log.addHandler(handler)
        log.setLevel(logging.WARNING)
        log.propagate = False
    try:
        yield handler
    finally:
        if debug:
            asyncio.get_running_loop().set_debug(False)
        log.removeHandler(handler)


async def child_batch(url: str, paths: list[Path], debug: bool, jobs: int = 24) -> dict[str, Any]:
    import dreamo_async as d

    ticker = Ticker()
    async with d.DreamOClient(KEY, base_url=url, max_concurrency=4) as client:
        app_started()
        with watching_slow_callbacks(debug) as slow, CallbackClock() as cpu:
            ticker.start()
            await asyncio.sleep(IDLE_S)
            idle = ticker.take() | {"cpu": cpu.take()}
            started = time.perf_counter()
            await asyncio.gather(
                *(client.generate(prompt=PROMPT, images=list(paths)) for _ in range(jobs))
            )
            busy = ticker.take() | {"cpu": cpu.take()}
            elapsed = time.perf_counter() - started
            await asyncio.sleep(max(elapsed - IDLE_S, 0.0))  # idle as long as busy, in all
            idle = merge_idle(idle, ticker.take() | {"cpu": cpu.take()})
            await ticker.stop()
    return {"idle": idle, "busy": busy, "slow": slow.seen, "seconds": elapsed, "cpu_seen": cpu.seen}


async def child_first(url: str, paths: list[Path], debug: bool) -> dict[str, Any]:
    import dreamo_async as d

    ticker = Ticker()
    client = d.DreamOClient(KEY, base_url=url, max_concurrency=4)
    entered = time.perf_counter()
    async with client:
        enter_ms = (time.perf_counter() - entered) * 1e3
        with watching_slow_callbacks(debug) as slow, CallbackClock() as cpu:
            ticker.start()
            await asyncio.sleep(IDLE_S)
            idle = ticker.take() | {"cpu": cpu.take()}
            await client.generate(prompt=PROMPT, images=list(paths))
            busy = ticker.take() | {"cpu": cpu.take()}
            await ticker.stop()
    return {
        "idle": idle,
        "busy": busy,
        "slow": slow.seen,
        "enter_ms": enter_ms,
        "cpu_seen": cpu.seen,
    }


async def child_web(url: str, paths: list[Path], debug: bool) -> None:
    """Serve the app; print ``READY <port>``; answer the measuring requests of the parent."""
    from aiohttp import web

    import dreamo_async as d

    ticker = Ticker()
    state: dict[str, Any] = {}

    async def dreamo_ctx(app: web.Application) -> Any:
        async with d.DreamOClient(KEY, base_url=url, max_concurrency=4) as client:
            app["dreamo"] = client
            yield

    async def generate(request: web.Request) -> web.Response:
        body = await request.json()
        result = await request.app["dreamo"].generate(
            prompt=body["prompt"], images=[Path(p) for p in body["images"]]
        )
        return web.json_response({"task_id": result.task_id})

    async def app_alone(request: web.Request) -> web.Response:
        """The same request parsed and answered, the job replaced by a wait: the app's
        (aiohttp.web's) own share of the lag, as a baseline."""
        body = await request.json()
        await asyncio.sleep(APP_ALONE_S)
        return web.json_response({"images": len(body["images"])})

    async def mark(request: web.Request) -> web.Response:
        what = request.match_info["what"]
        if what == "start":
            ticker.take()
            state["cpu"].take()
            return web.json_response({})
        figures: dict[str, Any] = ticker.take() | {"cpu": state["cpu"].take()}
        if what == "stop":
            figures["slow"], state["slow"].seen = state["slow"].seen, []
            figures["cpu_seen"], state["cpu"].seen = state["cpu"].seen, []
        return web.json_response(figures)

    app = web.Application()
    app.cleanup_ctx.append(dreamo_ctx)
    app.add_routes(
        [
            web.post("/generate", generate),
            web.post("/app_alone", app_alone),
            web.post("/_measure/{what}", mark),
        ]
    )
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    app_started()
    with watching_slow_callbacks(debug) as slow, CallbackClock() as cpu:
        state["slow"], state["cpu"] = slow, cpu
        ticker.start()
        print(f"READY {port}", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        await ticker.stop()
    await runner.cleanup()


def app_started() -> None:
    """With ``--gc-freeze``: what an app may do once started (the README's advice):
    move every object alive into the permanent generation, so full collections later
    walk only what was made since (a full one took 14-22 ms in the web scenario)."""
    if os.environ.get(GC_FREEZE_ENV):
        gc.collect()
        gc.freeze()


def child_main(scenario: str, url: str, debug: bool) -> None:
    paths = looplag_jpegs()
    if scenario == "web":
        asyncio.run(child_web(url, paths, debug))
        return
    run = child_batch if scenario == "batch" else child_first
    result = asyncio.run(run(url, paths, debug))
    print("RESULT " + json.dumps(result), flush=True)


# -- driving (parent side) -------------------------------------------------------------


def _child(scenario: str, url: str, debug: bool) -> subprocess.Popen[str]:
    args = [sys.executable, str(Path(__file__)), "--child", scenario, url]
    if debug:
        args.append("--debug")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cpus = CLIENT_CPUS
    return subprocess.Popen(
        args,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=None if cpus is None else lambda: os.sched_setaffinity(0, cpus),
    )


def run_script_child(scenario: str, url: str, debug: bool) -> dict[str, Any]:
    process = _child(scenario, url, debug)
    out, _ = process.communicate(timeout=600)
    for line in out.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])  # type: ignore[no-any-return]
    raise RuntimeError(f"{scenario} child failed: {out[-2000:]}")


def run_web_child(url: str, debug: bool, paths: list[Path], callers: int = 50) -> dict[str, Any]:
    import aiohttp

    process = _child("web", url, debug)
    assert process.stdin is not None
    assert process.stdout is not None
    try:
        line = process.stdout.readline().strip()
        if not line.startswith("READY "):
            raise RuntimeError(f"web child did not start: {line!r}")
        app = f"http://127.0.0.1:{line.split()[1]}"

        async def drive() -> dict[str, Any]:
            body = {"prompt": PROMPT, "images": [str(p) for p in paths]}
            timeout = aiohttp.ClientTimeout(total=600)
            async with aiohttp.ClientSession(timeout=timeout) as http:

                async def post(path: str, payload: Any = None) -> Any:
                    async with http.post(app + path, json=payload) as response:
                        response.raise_for_status()
                        return await response.json()

                await post("/_measure/start")
                await asyncio.sleep(IDLE_S)
                idle = await post("/_measure/idle")
                await asyncio.gather(*(post("/app_alone", body) for _ in range(callers)))
                app_alone = await post("/_measure/app")
                started = time.perf_counter()
                await asyncio.gather(*(post("/generate", body) for _ in range(callers)))
                elapsed = time.perf_counter() - started
                busy = await post("/_measure/stop")
                await asyncio.sleep(max(elapsed - IDLE_S, 0.0))  # idle as long as busy, in all
                idle_after = await post("/_measure/idle")
            return {
                "idle": merge_idle(idle, idle_after),
                "app_alone": app_alone,
                "busy": busy,
                "slow": busy.pop("slow"),
                "cpu_seen": busy.pop("cpu_seen"),
                "seconds": elapsed,
            }

        return asyncio.run(drive())
    finally:
        process.stdin.close()
        process.wait(timeout=60)


def measure(scenario: str, url: str, debug: bool, paths: list[Path]) -> dict[str, Any]:
    if scenario == "web":
        return run_web_child(url, debug, paths)
    return run_script_child(scenario, url, debug)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--scenario", choices=SCENARIOS, nargs="+", default=list(SCENARIOS))
    parser.add_argument("--no-debug-run", action="store_true", help="skip the slow-callback run")
    parser.add_argument(
        "--no-pin", action="store_true", help="service, callers and client share all CPUs"
    )
    parser.add_argument(
        "--gc-freeze", action="store_true", help="the measured app calls gc.freeze() once started"
    )
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args.child[0], args.child[1], args.debug)
        return

    if args.gc_freeze:
        os.environ[GC_FREEZE_ENV] = "1"
    paths = looplag_jpegs()
    sizes = ", ".join(f"{p.stat().st_size:,}" for p in paths)
    others = _pin_cpus(not args.no_pin)
    where = (
        f"client on CPU {sorted(CLIENT_CPUS)}, service and callers on {sorted(others)}"
        if CLIENT_CPUS is not None and others is not None
        else "all processes on all CPUs"
    )
    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs; inputs {sizes} bytes; "
        f"medians of {args.runs} runs, each in a fresh process; service in another process; "
        f"{where}" + ("; the app calls gc.freeze() once started" if args.gc_freeze else "")
    )
    rows = []
    slow_lines: list[str] = []
    cpu_lines: list[str] = []
    late_lines: list[str] = []
    with fake_server_process(cpus=others) as url:
        for scenario in args.scenario:
            runs = [measure(scenario, url, False, paths) for _ in range(args.runs)]

            def med(part: str, key: str, runs: list[dict[str, Any]] = runs) -> float:
                return float(statistics.median(r[part][key] for r in runs))

            worst, idle_worst = med("busy", "worst"), med("idle", "worst")
            extra = ""
            if scenario == "first":
                extra = f"async with: {statistics.median(r['enter_ms'] for r in runs):.0f} ms"
            elif "seconds" in runs[0]:
                extra = f"{statistics.median(r['seconds'] for r in runs):.1f} s"
            verdict = "ok" if worst <= 5 and worst - idle_worst <= 2 else "MISSED"
            rows.append(
                [
                    scenario,
                    round(idle_worst, 2),
                    round(med("idle", "p99"), 2),
                    round(med("app_alone", "worst"), 2) if "app_alone" in runs[0] else "-",
                    round(worst, 2),
                    round(med("busy", "p99"), 2),
                    f"{max(r['busy']['worst'] for r in runs):.2f}",
                    verdict,
                    round(med("idle", "cpu"), 2),
                    round(med("busy", "cpu"), 2),
                    f"{med('idle', 'steal'):.0f} / {med('busy', 'steal'):.0f}",
                    extra,
                ]
            )
            cpu_lines.append(_slow_report(scenario, [s for r in runs for s in r["cpu_seen"]]))
            late_lines.append(_late_report(scenario, runs))
            if not args.no_debug_run:
                seen = measure(scenario, url, True, paths)["slow"]
                slow_lines.append(_slow_report(scenario, seen))
    print_table(
        "worst event-loop lag, ms (1 ms ticker; target <= 5 ms and <= idle + 2 ms)",
        [
            "scenario",
            "idle worst",
            "idle p99",
            "app alone",
            "worst",
            "p99",
            "max of runs",
            "",
            "idle CPU/cb",
            "max CPU/cb",
            "steal ms idle / busy",
            "notes",
        ],
        rows,
    )
    print(
        "\nCPU/cb: the most CPU time one loop callback took (thread time, medians of the runs):"
        " what the loop itself did, whatever else the machine ran."
    )
    print(
        "app alone (web): the worst lag while the same 50 requests reach a handler that"
        f" parses them and waits {APP_ALONE_S} s instead of generating: aiohttp.web's share."
    )
    print(
        "idle: the ticker on the idle loop for as long as the work took (1 s before it,"
        " the rest after). steal: time the hypervisor gave the client's CPU to other"
        " machines in those windows (medians; 10 ms resolution)."
    )
    print(f"callbacks over {CPU_NOTE_S * 1e3:.0f} ms of CPU, all runs:")
    print("\n".join(cpu_lines))
    print(
        f"\nticks over {LATE_S * 1e3:.0f} ms late, all runs, by what the loop thread did"
        " meanwhile (the largest part); each run's worst tick split into loop CPU /"
        " run-queue wait / off CPU, ms:"
    )
    print("\n".join(late_lines))
    if slow_lines:
        print(f"\ncallbacks over {SLOW_S * 1e3:.0f} ms in a debug-mode run (debug mode is slower):")
        print("\n".join(slow_lines))


def _pin_cpus(pin: bool) -> set[int] | None:
    """Split the CPUs: the last one for the service and the callers (this process, and
    the service it starts), the others for the measured processes; None if not pinned."""
    global CLIENT_CPUS
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return None
    if not pin or len(cpus) < 2:
        return None
    CLIENT_CPUS, others = set(cpus[:-1]), {cpus[-1]}
    os.sched_setaffinity(0, others)
    return others


def _late_report(scenario: str, runs: Sequence[dict[str, Any]]) -> str:
    parts = []
    for phase in ("idle", "app_alone", "busy"):
        if phase not in runs[0]:
            continue
        late = {k: sum(r[phase]["late"][k] for r in runs) for k in runs[0][phase]["late"]}
        text = ", ".join(f"{k} {v}" for k, v in late.items())
        worst = "; ".join("/".join(f"{p:.1f}" for p in r[phase]["worst_parts"]) for r in runs)
        parts.append(f"{phase}: {text} (worst: {worst})")
    return f"  {scenario}: " + " | ".join(parts)


def _slow_report(scenario: str, seen: Sequence[Sequence[Any]]) -> str:
    if not seen:
        return f"  {scenario}: none"
    by_name: dict[str, list[float]] = {}
    for name, ms in seen:
        by_name.setdefault(name, []).append(ms)
    parts = [
        f"{name} x{len(v)} (max {max(v):.1f} ms)"
        for name, v in sorted(by_name.items(), key=lambda kv: -max(kv[1]))
    ]
    return f"  {scenario}: " + "; ".join(parts)


if __name__ == "__main__":
    main()

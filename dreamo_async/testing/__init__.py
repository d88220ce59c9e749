"""The test seam: a faithful local simulation of the service, for tests, benchmarks and demos.

The library never imports this package; users import it in their own tests::

    from dreamo_async.testing import FakeDreamOServer, Fault

    async with FakeDreamOServer(api_key="k", task_duration_ms=20) as server:
        server.inject("create", Fault.status(503, retry_after=0.01))
        async with DreamOClient(api_key="k", base_url=server.url) as client:
            ...
        assert server.stats.creates == 1

Scripted outcomes ride in the prompt: ``[fail:003013095]``, ``[slow:500]``,
``[never]``. Transport faults: ``server.inject(endpoint, fault, times=n)`` with
endpoint ``"create"``, ``"poll"`` or ``"download"`` and a fault from
``Fault.status(code, body=..., content_type=..., retry_after=...)``,
``Fault.envelope_error()``, ``Fault.drop_before()``, ``Fault.drop_after()``,
``Fault.create_then_500()``, ``Fault.invalid_json()``, ``Fault.wrong_shape()``,
``Fault.slow(ms)``, ``Fault.huge(size)`` (any of them ``.after(ms)``); or seeded
random faults with ``server.chaos(probability, seed=...)``; every fault at once, with
per-task faults (never finishing, vanishing into 404) and 429 storms, with
``FakeDreamOServer(chaos_config=ChaosConfig.everything(0.03, seed=1))``, and a whole
run checked for lost jobs and leaks with ``await run_chaos(500)``. Counters from the
server's side are in ``server.stats`` (:class:`ServerStats`).

With pytest and pytest-asyncio installed, the ``dreamo_server`` and
``dreamo_server_factory`` fixtures are available with no set-up (pytest11 plugin).
Standalone, in another process: ``python -m dreamo_async.testing --port 0``.
"""

from ..retry import set_testing
from ._faults import CHAOS_FAULTS, Endpoint, Fault
from ._images import image_info, make_jpeg, make_png, sample_images
from ._stats import RecordedRequest, RefusalRecord, ServerStats, max_in_window
from ._tasks import FakeTask
from .chaos import ChaosConfig
from .harness import ChaosReport, run_chaos
from .server import CREATE_PATH, TASK_PATH, FakeDreamOServer

__all__ = [
    "CHAOS_FAULTS",
    "CREATE_PATH",
    "TASK_PATH",
    "ChaosConfig",
    "ChaosReport",
    "Endpoint",
    "FakeDreamOServer",
    "FakeTask",
    "Fault",
    "RecordedRequest",
    "RefusalRecord",
    "ServerStats",
    "image_info",
    "make_jpeg",
    "make_png",
    "max_in_window",
    "run_chaos",
    "sample_images",
    "set_testing",
]

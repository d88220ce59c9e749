"""The test seam: a faithful local simulation of the service, for tests, benchmarks and demos.

The library never imports this package; users import it in their own tests::

    from dreamo_async.testing import FakeDreamOServer, Fault

    async with FakeDreamOServer(api_key="k", task_duration_ms=20) as server:
        async with DreamOClient(api_key="k", base_url=server.url) as client:
            ...
        assert server.stats.creates == 1
"""

from ..retry import set_testing
from ._faults import Endpoint, Fault
from ._images import make_jpeg, make_png, sample_images
from .server import FakeDreamOServer, ServerStats

__all__ = [
    "Endpoint",
    "FakeDreamOServer",
    "Fault",
    "ServerStats",
    "make_jpeg",
    "make_png",
    "sample_images",
    "set_testing",
]

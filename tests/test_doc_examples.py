"""Every Python block of README.md and docs/*.md runs, so the examples cannot rot.

Each block runs as copied, in its own process and a fresh folder, against a
FakeDreamOServer: ``DREAMO_API_KEY`` is its key, and a client built without a
``base_url`` is pointed at it (the block never reaches the real service). Image
files the block names (``"cat.jpg"``, ``Path("hat.png")``) are created in the folder
from the bundled sample images. A block that defines ``test_`` functions runs under
pytest (with ``asyncio_mode = "auto"``, as the docs say), with the package's plugin.

A block that is not meant to run (a fragment, an app to serve, Redis) is preceded by
an HTML comment ``<!-- not-run: why -->``.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import sys
from pathlib import Path

import attrs
import pytest

from dreamo_async.testing import FakeDreamOServer, sample_images

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
NOT_RUN = re.compile(r"<!--\s*not-run\b")
FENCE = re.compile(r"^```python[ \t]*$")
IMAGE_NAME = re.compile(r"""["']([\w./-]+\.(jpe?g|png))["']""")
TIMEOUT = 60.0

#: Run before each block: test mode (no poll or retry delays) and the fake service as
#: the default base URL, then the block itself (top-level ``await`` allowed).
RUNNER = """
import ast, asyncio, functools, inspect, os, sys
import dreamo_async as d

d.set_testing()
_init = d.DreamOClient.__init__

@functools.wraps(_init)
def _to_the_fake(self, *args, **kwargs):
    kwargs.setdefault("base_url", os.environ["DREAMO_BASE_URL"])
    _init(self, *args, **kwargs)

d.DreamOClient.__init__ = _to_the_fake
path = sys.argv[1]
sys.argv = [path]
code = compile(open(path).read(), path, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
result = eval(code, {"__name__": "__main__", "__file__": path})
if inspect.iscoroutine(result):
    asyncio.run(result)
"""


@attrs.frozen
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    code: str

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def python_blocks(page: Path) -> tuple[list[Block], list[Block]]:
    """The page's ``python`` blocks: (to run, marked not-run)."""
    run: list[Block] = []
    skipped: list[Block] = []
    lines = page.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        if not FENCE.match(lines[i]):
            i += 1
            continue
        start = i
        before = next((text for text in reversed(lines[:start]) if text.strip()), "")
        i += 1
        body: list[str] = []
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i])
            i += 1
        i += 1
        block = Block(page, start + 1, "\n".join(body) + "\n")
        (skipped if NOT_RUN.search(before) else run).append(block)
    return run, skipped


BLOCKS = [block for page in PAGES for block in python_blocks(page)[0]]


def test_the_pages_have_blocks_to_run() -> None:
    assert {block.page.name for block in BLOCKS} >= {"README.md", "quickstart.md", "bulk.md"}


def sample_for(name: str) -> Path:
    suffix = ".png" if name.endswith(".png") else ".jpg"
    return next(path for path in sample_images() if path.suffix == suffix)


def prepare(folder: Path, block: Block) -> Path:
    """Write the block into ``folder`` beside the image files it names."""
    for match in IMAGE_NAME.finditer(block.code):
        target = folder / match.group(1)
        if not target.resolve().is_relative_to(folder.resolve()):
            continue  # a path outside the folder (e.g. "../x.jpg"): left as it is
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sample_for(target.name), target)
    is_test = re.search(r"^(async )?def test_", block.code, re.MULTILINE) is not None
    script = folder / ("test_block.py" if is_test else "block.py")
    script.write_text(block.code, encoding="utf-8")
    return script


@pytest.mark.parametrize("block", BLOCKS, ids=[block.name for block in BLOCKS])
async def test_the_block_runs(
    block: Block, dreamo_server: FakeDreamOServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = prepare(tmp_path, block)
    if script.name.startswith("test_"):
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
        command += ["-o", "asyncio_mode=auto", "-o", "asyncio_default_fixture_loop_scope=function"]
        command += ["-W", "error", script.name]
    else:
        command = [sys.executable, "-W", "error::RuntimeWarning", "-c", RUNNER, script.name]
    assert dreamo_server.api_key is not None
    monkeypatch.setenv("DREAMO_API_KEY", dreamo_server.api_key)
    monkeypatch.setenv("DREAMO_BASE_URL", dreamo_server.url)
    monkeypatch.delenv("VTRIX_API_KEY", raising=False)
    process = await asyncio.create_subprocess_exec(
        *command,
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(TIMEOUT):
            out, err = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    report = f"{block.name}\n--- stdout\n{out.decode()}\n--- stderr\n{err.decode()}"
    assert process.returncode == 0, report
    assert "Exception ignored" not in err.decode(), report
    assert dreamo_server.stats.refused_total == 0, (report, dreamo_server.stats.refusals)


def test_blocks_marked_not_run_are_left_out(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "text\n\n```python\nprint(1)\n```\n\n<!-- not-run: a fragment -->\n"
        "```python\nclient.wait(x)\n```\n\n```sh\nmake docs\n```\n",
        encoding="utf-8",
    )
    run, skipped = python_blocks(page)
    assert [(block.line, block.code) for block in run] == [(3, "print(1)\n")]
    assert [(block.line, block.code) for block in skipped] == [(8, "client.wait(x)\n")]

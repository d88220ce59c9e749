"""Coverage-guided fuzzing (atheris / libFuzzer) of the parsers of untrusted bytes.

    python fuzz/atheris_run.py image|response|error_body|retry_after [seconds]

The targets are those of ``tests/fuzz_targets.py``, the same contract the
hypothesis tests check: accepted, or refused with ImageError / APIError; any
other exception is a crash and libFuzzer saves the input in ``.fuzz-corpus/``.
``make fuzz`` runs every target for ``FUZZ_SECONDS`` (default 60); libFuzzer's last
line ("Done N runs in S second(s)") is how many inputs it survived.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import atheris  # noqa: E402

with atheris.instrument_imports(include=["dreamo_async"]):
    from tests.fuzz_targets import (
        jpeg_with_frame,
        png_chunk,
        png_with_ihdr,
        target_error_body,
        target_image,
        target_response,
        target_retry_after,
    )

from dreamo_async.testing import make_jpeg, make_png  # noqa: E402

TARGETS = {
    "image": target_image,
    "response": target_response,
    "error_body": target_error_body,
    "retry_after": target_retry_after,
}
_TASK = {
    "id": "d5u5obte8783ap44qtj0",
    "status": "completed",
    "model": "spark_multi_dreamo",
    "created_at": 1769757744,
    "output": [{"content": [{"type": "image", "url": "https://x/0.jpg", "jobId": "j"}]}],
    "usage": {"cost": "0.03", "discount": 1},
    "metadata": {"completed_at": 1769757790},
}
SEEDS: dict[str, list[bytes]] = {
    "image": [
        make_png(64, 48),
        make_jpeg(64, 48),
        png_with_ihdr(65535, 65535, tail=png_chunk(b"IDAT", 2**31)),
        jpeg_with_frame(65535, 65535, tail=b"\xff\xd9"),
    ],
    "response": [
        json.dumps(_TASK).encode(),
        json.dumps({"data": _TASK, "status": {"code": 200, "message": "success"}}).encode(),
        b'{"id": "t", "status": "failed", "error": {"code": "003013095", "message": "x"}}',
        b'{"id": "t", "status": "in_progress", "progress": 0.45}',
    ],
    "error_body": [
        b'{"error": {"code": "429", "message": "slow down", "retry_after": 2}}',
        b'{"status": {"code": 500, "message": "x"}}',
        b"<html>502 Bad Gateway</html>",
    ],
    "retry_after": [b"120", b"Wed, 21 Oct 2015 07:28:00 GMT", b"0.5"],
}


def main() -> None:
    name = sys.argv[1]
    seconds = int(sys.argv[2]) if len(sys.argv) > 2 else 60
    target = TARGETS[name]
    corpus = ROOT / ".fuzz-corpus" / name
    corpus.mkdir(parents=True, exist_ok=True)
    for index, seed in enumerate(SEEDS[name]):
        (corpus / f"seed-{index}").write_bytes(seed)
    atheris.Setup(
        [
            sys.argv[0],
            f"-max_total_time={seconds}",
            "-rss_limit_mb=2048",
            "-max_len=65536",
            "-timeout=10",
            f"-artifact_prefix={ROOT / '.fuzz-corpus'}/crash-{name}-",
            str(corpus),
        ],
        target,
    )
    atheris.Fuzz()


if __name__ == "__main__":
    main()

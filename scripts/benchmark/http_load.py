"""The HTTP side of the serve section: `inference.py serve` in a child process and a load of
concurrent clients against it."""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from scripts.benchmark.context import REPO_ROOT


def percentiles(ms: Sequence[float]) -> tuple[float, float]:
    """p50 and p99 of latencies."""
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


async def run_load(base: str, queries: Sequence[str], clients: int, seconds: float) -> dict[str, Any]:
    """`clients` concurrent loops of `/api/search` requests (no re-rank) for `seconds`.

    Each client has its own connection (a client of its own), as independent users would.
    """
    import asyncio

    import httpx

    latencies: list[float] = []
    errors: list[str] = []
    stop = time.perf_counter() + seconds

    async def client_loop(w: int) -> None:
        async with httpx.AsyncClient(base_url=base, timeout=30.0) as client:
            i = w
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                try:
                    r = await client.get("/api/search", params={"q": queries[i % len(queries)], "k": 10, "rerank": 0})
                    if r.status_code != 200:
                        errors.append(f"HTTP {r.status_code}")
                    else:
                        latencies.append((time.perf_counter() - t0) * 1e3)
                except httpx.HTTPError as err:
                    errors.append(type(err).__name__)
                i += clients

    t_start = time.perf_counter()
    await asyncio.gather(*(client_loop(w) for w in range(clients)))
    elapsed = time.perf_counter() - t_start
    p50, p99 = percentiles(latencies) if latencies else (None, None)
    return {"requests": len(latencies), "errors": len(errors), "error_kinds": sorted(set(errors)),
            "elapsed_s": elapsed, "throughput": len(latencies) / elapsed, "p50_ms": p50, "p99_ms": p99}


def start_server(index_dir: str, checkpoint: str, workdir: str) -> tuple[Any, str, Any]:
    """`inference.py serve` in a child process on a free local port; returns (process, base URL, log)."""
    import socket
    import subprocess

    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = open(os.path.join(workdir, "serve.log"), "w")  # noqa: SIM115 (the caller closes it)
    proc = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "inference.py"), "serve", "--index_dir", index_dir, "--checkpoint", checkpoint,
         "--host", "127.0.0.1", "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO_ROOT),
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"inference.py serve exited ({proc.returncode}): {Path(log.name).read_text()[-2000:]}")
            try:
                if httpx.get(f"{base}/api/search", params={"q": "a dog", "k": 1}, timeout=5).status_code == 200:
                    return proc, base, log
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("inference.py serve did not answer within 120 s")
    except BaseException:
        # A failed start, or the section's time limit reached while waiting: no server is left behind.
        proc.terminate()
        log.close()
        raise

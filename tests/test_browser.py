"""A real browser on the served page: headless Chromium opens `/?q=...` on a live uvicorn server.

Needs Debian's `chromium` package (`apt-get install chromium`; `.ci/run` installs it when
missing); skipped with a reason otherwise. The screenshot is saved under the test's tmp path
and copied to `test-output/serve_page.png` (git-ignored).
"""
from __future__ import annotations

import re
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import uvicorn

from data.scene_render import render_split
from data.txt_db import TxtDb
from utils.pipeline.query import Searcher, TextReranker
from utils.pipeline.serving import create_app

REPO = Path(__file__).resolve().parents[1]
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
TIMEOUT_S = 90


@pytest.fixture(scope="module")
def browser() -> str:
    """Path of a Chromium binary (skips the module's tests, with the reason, when there is none)."""
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no Chromium installed: `apt-get install chromium` (Debian package) to run the browser test")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def live_server(workspace, retrieval_dir, tmp_path_factory):
    """A uvicorn server on 127.0.0.1 (free port) in a thread; stopped at the end of the module."""
    scenes = tmp_path_factory.mktemp("browser_scenes")
    render_split(workspace.data["root"], "test", scenes, size=96)
    searcher = Searcher(retrieval_dir, str(workspace.our_ckpt))
    reranker = TextReranker(searcher, str(workspace.our_cross_ckpt), alpha=0.5)
    app = create_app(searcher, reranker, render_dir=scenes, top_m=6)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            server.should_exit = True
            pytest.fail("uvicorn did not start within 30 s")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", searcher
    server.should_exit = True
    thread.join(timeout=10)


def _chromium(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--no-first-run", "--hide-scrollbars", f"--user-data-dir={profile}", *args]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"chromium did not finish within {TIMEOUT_S} s: {' '.join(cmd)}")


def test_page_in_headless_chromium(browser, live_server, workspace, tmp_path):
    base, searcher = live_server
    txt_id = searcher.txt_ids[5]
    caption = TxtDb(workspace.data["txt_db"]["test"]).record(txt_id)["raw"]
    expected = searcher.search_images(searcher.encode_text(caption), 10)
    from urllib.parse import urlencode

    url = f"{base}/?{urlencode({'q': caption, 'k': 6})}"
    dom = _chromium(browser, tmp_path / "profile", "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    column = dom.stdout.split('id="biencoder"')[1].split("</ol>")[0]
    shown = re.findall(r'data-image="([^"]+)"', column)
    assert shown == [name for name, _ in expected[:6]]
    assert 'id="reranked"' in dom.stdout and "re-rank" in dom.stdout

    shot = tmp_path / "serve_page.png"
    run = _chromium(browser, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1280,800", url)
    assert run.returncode == 0 and shot.is_file() and shot.stat().st_size > 10_000, run.stderr[-2000:]
    keep = REPO / "test-output" / "serve_page.png"
    keep.parent.mkdir(exist_ok=True)
    shutil.copyfile(shot, keep)
    print(f"screenshot: {shot} (copied to {keep})")

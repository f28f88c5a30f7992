"""The web app of `inference.py serve`: a search page and a JSON API over one loaded index.

    app = create_app(Searcher(index_dir, checkpoint), reranker, image_root=..., render_dir=...)

Routes:

* `GET /?q=TEXT&k=10&rerank=1`: the page: a search box, the bi-encoder's top-k images (and the
  re-ranked list beside it when a re-ranker is loaded) with scores and the time of each stage;
  `GET /?image=NAME` shows an image and its best captions (image -> text);
* `GET /api/search?q=TEXT&k=10&rerank=1`: the same as JSON;
* `GET /api/image/{name}?k=5`: an image's best captions as JSON;
* `GET /image/{name}`: the picture of an image: `{image_root}/{stem}.jpg` (COCO / Flickr30k
  file names), else the rendered scene `{render_dir}/{stem}.png`, else a placeholder.

Bad input (empty query, unknown image, k out of range) is answered 4xx with a message
(`{"error": ...}` from the API). Model work runs on one worker thread, in arrival order: the
process holds many connections, the CPU cores go to one query at a time, and no request waits
behind later ones (a FIFO queue keeps the tail latency near clients x service time).
"""
from __future__ import annotations

import asyncio
import contextlib
import html
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response

from utils.pipeline.query import Searcher, TextReranker

MAX_K = 100
DEFAULT_K = 10
IMAGE_CAPTIONS = 5
MAX_QUERY_CHARS = 1000


class RequestError(Exception):
    """A request the service refuses: its HTTP status and a message for the user."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def image_stem(name: str) -> str:
    """File stem of an img_db name (`COCO_val2014_000000391895.npz` -> `COCO_val2014_000000391895`)."""
    return name.removesuffix(".npz")


class SearchService:
    """What the page and the API do, without HTTP: validate, search, re-rank, time each stage."""

    def __init__(self, searcher: Searcher, reranker: TextReranker | None = None,
                 image_root: str | Path | None = None, render_dir: str | Path | None = None,
                 top_m: int = 20) -> None:
        self.searcher = searcher
        self.reranker = reranker
        self.image_root = Path(image_root) if image_root else None
        self.render_dir = Path(render_dir) if render_dir else None
        self.top_m = top_m
        self.max_k = min(MAX_K, len(searcher.img_ids))
        self._lock = threading.Lock()
        self._placeholder: bytes | None = None

    # ---------------------------------------------------------------- validation

    def check_k(self, k: Any, limit: int | None = None) -> int:
        """`k` as an int in [1, limit] (default: the images of the index, at most MAX_K)."""
        limit = limit or self.max_k
        try:
            value = int(k)
        except (TypeError, ValueError):
            raise RequestError(422, f"k must be an integer, got {k!r}") from None
        if not 1 <= value <= limit:
            raise RequestError(422, f"k must lie in [1, {limit}], got {value}")
        return value

    def check_image(self, name: str) -> str:
        """`name` when it is an image of the index (404 otherwise)."""
        if not self.searcher.has_image(name):
            raise RequestError(404, f"unknown image id {name!r}: not in this index")
        return name

    # ---------------------------------------------------------------- searches

    def search(self, q: str | None, k: Any = DEFAULT_K, rerank: Any = True) -> dict[str, Any]:
        """Text -> images: the bi-encoder list, the re-ranked list (or None) and stage times (ms)."""
        text = (q or "").strip()
        if not text:
            raise RequestError(400, "empty query: give a caption to search for (q=...)")
        if len(text) > MAX_QUERY_CHARS:
            raise RequestError(400, f"query too long: {len(text)} characters (at most {MAX_QUERY_CHARS})")
        k = self.check_k(k)
        if not self.searcher.can_search_text:
            raise RequestError(400, "this server was started without --checkpoint: text search is off")
        use_rerank = self.reranker is not None and str(rerank).lower() not in ("0", "false", "no", "off", "")
        timing: dict[str, float] = {}
        with self._lock:
            t0 = time.perf_counter()
            vector = self.searcher.encode_text(text)
            t1 = time.perf_counter()
            hits = self.searcher.search_images(vector, max(k, self.top_m) if use_rerank else k)
            t2 = time.perf_counter()
            timing["encode_ms"] = (t1 - t0) * 1e3
            timing["search_ms"] = (t2 - t1) * 1e3
            reranked = None
            if use_rerank:
                reranked = self.reranker.rerank(text, hits)[:k]
                timing["rerank_ms"] = (time.perf_counter() - t2) * 1e3
            timing["total_ms"] = (time.perf_counter() - t0) * 1e3
        return {
            "query": text,
            "k": k,
            "results": [self._hit(r, name, score) for r, (name, score) in enumerate(hits[:k], 1)],
            "reranked": None if reranked is None else [
                {**self._hit(r, row[0], row[1]), "biencoder": row[2], "cross": row[3]}
                for r, row in enumerate(reranked, 1)
            ],
            "alpha": None if reranked is None else self.reranker.alpha,
            "timing_ms": timing,
        }

    def image(self, name: str, k: Any = IMAGE_CAPTIONS) -> dict[str, Any]:
        """Image -> text: the image's best captions with their scores and texts."""
        self.check_image(name)
        k = self.check_k(k, min(MAX_K, len(self.searcher.txt_ids)))
        with self._lock:
            t0 = time.perf_counter()
            hits = self.searcher.search_image(name, k)
            took = (time.perf_counter() - t0) * 1e3
        return {
            "image": name,
            "url": f"/image/{quote(name)}",
            "captions": [{"rank": r, "txt_id": t, "score": s, "text": hits.texts.get(t)}
                         for r, (t, s) in enumerate(hits.results, 1)],
            "timing_ms": {"search_ms": took},
        }

    @staticmethod
    def _hit(rank: int, name: str, score: float) -> dict[str, Any]:
        return {"rank": rank, "image": name, "score": score, "url": f"/image/{quote(name)}"}

    # ---------------------------------------------------------------- pictures

    def picture(self, name: str) -> tuple[Path | bytes, str]:
        """The picture of an image: a file path or PNG bytes, and its media type."""
        self.check_image(name)
        stem = image_stem(name)
        if self.image_root is not None:
            path = self.image_root / f"{stem}.jpg"
            if path.is_file():
                return path, "image/jpeg"
        if self.render_dir is not None:
            path = self.render_dir / f"{stem}.png"
            if path.is_file():
                return path, "image/png"
        if self._placeholder is None:
            self._placeholder = _placeholder_png()
        return self._placeholder, "image/png"

    def warm_up(self) -> None:
        """One query through every stage, so the first user does not pay for lazy set-up."""
        if self.searcher.can_search_text:
            self.search("a photo", min(DEFAULT_K, self.max_k), True)


def _placeholder_png(size: int = 128) -> bytes:
    from PIL import Image, ImageDraw

    from data.scene_render import png_bytes

    img = Image.new("RGB", (size, size), (235, 235, 235))
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, 0, size - 1, size - 1), outline=(180, 180, 180))
    draw.text((size / 2, size / 2), "no picture", fill=(120, 120, 120), anchor="mm")
    return png_bytes(img)


# -------------------------------------------------------------------- HTML

_STYLE = """
body{font-family:sans-serif;margin:1.5em;color:#222}
form{margin-bottom:1em} input[type=text]{width:32em;font-size:1.1em;padding:.2em}
.cols{display:flex;gap:2em;align-items:flex-start}
.col{flex:1;min-width:0} ol{list-style:none;padding:0;display:flex;flex-wrap:wrap;gap:.6em}
li.hit{width:120px;font-size:.75em;text-align:center;overflow-wrap:anywhere}
li.hit img{width:96px;height:96px;object-fit:cover;border:1px solid #aaa}
.timing{color:#555;font-size:.9em} .error{color:#b00;font-weight:bold}
table.captions td{padding:.2em .6em}
"""


def _page(title: str, body: str, q: str = "", k: int = DEFAULT_K) -> str:
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>"
        "<h2><a href='/'>LightningDOT search</a></h2>"
        "<form method='get' action='/'>"
        f"<input type='text' name='q' id='q' value='{html.escape(q, quote=True)}' "
        "placeholder='a red dog next to a small blue car' autofocus> "
        f"<input type='number' name='k' min='1' max='{MAX_K}' value='{k}' style='width:4em'> "
        "<button type='submit'>search</button></form>"
        f"{body}</body></html>"
    )


def _hit_list(list_id: str, hits: Sequence[dict[str, Any]], extra: bool = False) -> str:
    items = []
    for h in hits:
        name = h["image"]
        detail = (f"<br>bi {h['biencoder']:.3f} / cross {h['cross']:.3f}" if extra else "")
        items.append(
            f"<li class='hit' data-image='{html.escape(name, quote=True)}' data-rank='{h['rank']}'>"
            f"<a href='/?{urlencode({'image': name})}'><img src='{h['url']}' alt='{html.escape(name, quote=True)}'></a>"
            f"<br>{h['rank']}. <span class='name' title='{html.escape(name, quote=True)}'>"
            f"{html.escape(image_stem(name))}</span>"
            f"<br>score <span class='score'>{h['score']:.4f}</span>{detail}</li>"
        )
    return f"<ol id='{list_id}'>{''.join(items)}</ol>"


def _results_html(result: dict[str, Any]) -> str:
    t = result["timing_ms"]
    stages = [f"encode {t['encode_ms']:.1f} ms", f"search {t['search_ms']:.1f} ms"]
    if "rerank_ms" in t:
        stages.append(f"re-rank {t['rerank_ms']:.1f} ms")
    cols = [f"<div class='col'><h3>bi-encoder: top {result['k']}</h3>{_hit_list('biencoder', result['results'])}</div>"]
    if result["reranked"] is not None:
        cols.append(
            f"<div class='col'><h3>re-ranked (alpha {result['alpha']:.2f} x bi-encoder + "
            f"{1 - result['alpha']:.2f} x cross-encoder)</h3>{_hit_list('reranked', result['reranked'], True)}</div>"
        )
    return (f"<p class='timing' id='timing'>query <b>{html.escape(result['query'])}</b>: "
            f"{', '.join(stages)} (total {t['total_ms']:.1f} ms)</p><div class='cols'>{''.join(cols)}</div>")


def _image_html(result: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr class='caption' data-txt-id='{html.escape(c['txt_id'], quote=True)}'><td>{c['rank']}.</td>"
        f"<td>{c['score']:.4f}</td><td>{html.escape(c['text'] or c['txt_id'])}</td></tr>"
        for c in result["captions"]
    )
    name = html.escape(result["image"])
    return (f"<h3>image {name}</h3><img src='{result['url']}' alt='{name}' width='256' height='256' "
            f"style='border:1px solid #aaa'><h3>its top {len(result['captions'])} captions</h3>"
            f"<table class='captions' id='captions'>{rows}</table>")


# -------------------------------------------------------------------- the app


def create_app(searcher: Searcher, reranker: TextReranker | None = None,
               image_root: str | Path | None = None, render_dir: str | Path | None = None,
               top_m: int = 20, warm_up: bool = True) -> FastAPI:
    """The FastAPI app over one loaded `searcher` (and optional `reranker`).

    Args:
        searcher: the loaded retrieval directory (with its bi-encoder for text queries).
        reranker: re-scores the top `top_m` of a text query; None for the bi-encoder alone.
        image_root: folder of the real pictures, `{stem}.jpg`.
        render_dir: folder of rendered synthetic scenes, `{stem}.png`.
        top_m: bi-encoder candidates the re-ranker scores (at least k).
        warm_up: run one query before serving.
    """
    service = SearchService(searcher, reranker, image_root, render_dir, top_m)
    if warm_up:
        service.warm_up()
    # One model thread: requests queue in arrival order instead of racing for a lock.
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="search")

    async def run(fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(worker, fn, *args)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        worker.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="LightningDOT search", docs_url="/api/docs", redoc_url=None, lifespan=lifespan)
    app.state.service = service

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, err: RequestError) -> Response:
        if request.url.path != "/":
            return JSONResponse({"error": err.message}, status_code=err.status)
        return HTMLResponse(_page("error", f"<p class='error' id='error'>{html.escape(err.message)}</p>"),
                            status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError) -> Response:
        parts = [f"{'.'.join(str(x) for x in e.get('loc', ())[1:]) or 'request'}: {e.get('msg')}"
                 for e in err.errors()]
        return JSONResponse({"error": "; ".join(parts)}, status_code=422)

    @app.get("/", response_class=HTMLResponse)
    async def page(q: str | None = None, k: str = str(DEFAULT_K), rerank: str = "1", image: str | None = None) -> HTMLResponse:
        k_shown = k if k.isdigit() else DEFAULT_K
        if image is not None:
            result = await run(service.image, image, IMAGE_CAPTIONS)
            return HTMLResponse(_page(f"image {image}", _image_html(result), k=k_shown))
        if q is None:
            note = "" if searcher.can_search_text else "<p class='error'>text search is off (no --checkpoint)</p>"
            return HTMLResponse(_page("LightningDOT search", note, k=k_shown))
        try:
            result = await run(service.search, q, k, rerank)
        except RequestError as err:
            body = f"<p class='error' id='error'>{html.escape(err.message)}</p>"
            return HTMLResponse(_page("error", body, q or "", k_shown), status_code=err.status)
        return HTMLResponse(_page(f"{result['query']} - search", _results_html(result), result["query"], result["k"]))

    @app.get("/api/search")
    async def api_search(q: str = "", k: str = str(DEFAULT_K), rerank: str = "1") -> dict[str, Any]:
        return await run(service.search, q, k, rerank)

    @app.get("/api/image/{name}")
    async def api_image(name: str, k: str = str(IMAGE_CAPTIONS)) -> dict[str, Any]:
        return await run(service.image, name, k)

    @app.get("/image/{name}")
    def picture(name: str) -> Response:
        content, media = service.picture(name)
        headers = {"Cache-Control": "max-age=3600"}
        if isinstance(content, Path):
            return FileResponse(content, media_type=media, headers=headers)
        return Response(content, media_type=media, headers=headers)

    return app


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve `app` with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="warning")

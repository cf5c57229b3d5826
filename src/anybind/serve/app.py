"""The HTTP API and web page of a bundle (and an index): `anybind serve`.

    app = create_app("bundles/clipart", index="indexes/clipart")   # any ASGI server runs it
    serve("bundles/clipart", index="indexes/clipart", port=8000)   # or uvicorn, here

Routes: ``POST /embed`` (JSON ``{"texts": [...]}`` or a multipart image or audio upload) -> embeddings;
``POST /classify`` (an image or audio upload, optional ``labels``) -> zero-shot labels, most likely first;
``GET /search?q=...&k=10&modality=image`` (with an index) -> items with score and image URL (audio
URL, text); ``POST /search`` (a multipart image or audio upload, ``k``, ``modality``) -> the same
for a query clip or picture (any-to-any: the rows of one indexed modality, or all);
``GET /images/{item_id}``, ``GET /audio/{item_id}?sub=0`` -> an indexed image or clip (only items
the index lists: an id is looked up, never joined to a path); ``GET /health``; ``GET /`` the web
page; OpenAPI docs at ``/docs`` (Swagger UI) and ``/redoc``, from packaged assets (no network).

An upload is audio when its form says so (a field ``type=audio``, or the file part is named
``audio``), its type is ``audio/*``, its name ends in an audio extension, or its bytes start like
WAV, FLAC, OGG, MP3 or AIFF; otherwise it is an image. Audio is decoded with soundfile (browsers
record webm/ogg-opus, which libsndfile may not read: the page converts recordings to 16-bit WAV
with the Web Audio API before uploading) and refused with the reason when it is unreadable (415),
empty, silent, clipped or longer than `max_audio_seconds` (422).

Why it is built this way: every error is a 4xx/5xx JSON ``{"error": message}`` and never takes
the server down; uploads are read with a size limit before anything decodes them; model calls
run in the threadpool behind one lock (encoders are not re-entrant), so the event loop keeps
answering /health, static images and queued requests while a model works; concurrent requests'
encodings are gathered into one batch (`batching.MicroBatcher`: one model call on 16 queries costs
far less than 16 calls). The server listens before the bundle is loaded: /health (liveness) answers
at once, /ready (readiness) only once the bundle and index are loaded.
"""

import importlib.util
import io
import json
import logging
import mimetypes
import os
import re
import threading
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .._deps import require
from ..errors import AnybindError, DataError, MissingDependencyError
from .access import install_access
from .batching import DEFAULT_MAX_BATCH, DEFAULT_MAX_WAIT_MS, MicroBatcher
from .ops import configure_access_log, install_ops, sigterm_ends_cleanly

log = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD = 10 * 2**20
#: form fields besides the image (labels) and multipart framing may add this much to an upload
FORM_SLACK = 256 * 2**10
MAX_TEXTS, MAX_TEXT_CHARS, MAX_LABELS, MAX_K = 256, 2000, 1000, 1000
#: deepest JSON nesting accepted: a request needs 2; json.loads recurses once per level
MAX_JSON_DEPTH = 32
#: a JSON string, or an unterminated one up to the end: a match from any quote succeeds at once
#: (never backtracks nor retries), so stripping the strings is one linear pass
_JSON_STRING = re.compile(rb'"(?:[^"\\]+|\\.)*(?:"|\\?\Z)', re.DOTALL)
_NOT_BRACKET = re.compile(rb"[^\[\]{}]+")
#: the longest audio clip accepted (seconds): Whisper's window; longer speech is cut by encoders anyway
DEFAULT_MAX_AUDIO_SECONDS = 30.0
PAGE_CSP = ("default-src 'self'; img-src 'self' data: blob:; media-src 'self' blob:; style-src 'self' 'unsafe-inline'; "
            "script-src 'self' 'unsafe-inline'; connect-src 'self'; object-src 'none'; base-uri 'none'")


class ApiError(AnybindError):
    """A request the API refuses: `status` is the HTTP status, the message says what to send."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers


def _fastapi():
    return require("fastapi", "the HTTP API (anybind serve)", "fastapi", extra="serve")


def create_app(bundle, index=None, max_upload_bytes: int = DEFAULT_MAX_UPLOAD, labels: list[str] | None = None,
               max_audio_seconds: float = DEFAULT_MAX_AUDIO_SECONDS, *, load: bool = True,
               max_batch: int = DEFAULT_MAX_BATCH, batch_wait_ms: float = DEFAULT_MAX_WAIT_MS,
               api_keys=None, public=None, cors_origins=(), rate_limit=None):
    """A FastAPI app serving `bundle` (a folder or a loaded bundle) and optionally `index`.

    `labels` replaces the bundle's default zero-shot classes (`Bundle.default_labels`)
    for /classify requests that give none, and for the page's editable label list.
    `max_audio_seconds` is the longest audio upload accepted. Concurrent requests' encodings are
    gathered into batches of up to `max_batch` items, waiting at most `batch_wait_ms` (1: off).
    With `load=False` only bundle.json is read now: call `app.state.served.load()` (serve() does,
    in a thread) and /ready answers 503 until it returns.
    """
    fastapi = _fastapi()
    if not any(importlib.util.find_spec(m) for m in ("python_multipart", "multipart")):
        raise MissingDependencyError("image uploads (anybind serve)", "python-multipart", "serve")
    if int(max_upload_bytes) < 1:
        raise AnybindError("the upload limit must be positive (--max-upload-mb)")
    if not float(max_audio_seconds) > 0:
        raise AnybindError("the audio length limit must be positive (--max-audio-seconds)")
    ctx = _Served(bundle, index, int(max_upload_bytes), labels, float(max_audio_seconds))
    ctx.batcher = MicroBatcher(ctx.encode_batch, max_batch, batch_wait_ms)
    if load:
        ctx.load()
    info = ctx.info
    app = fastapi.FastAPI(
        title="anybind", version=_version(), docs_url=None, redoc_url=None,  # _add_docs_routes: offline
        description=f"Embeddings, zero-shot classification and search with the bundle `{ctx.bundle_path}` "
                    f"({', '.join(info['modalities'])}; {info['dim']} dimensions).")
    _add_error_handlers(app)
    _add_docs_routes(app)
    _add_info_routes(app, ctx)
    _add_model_routes(app, ctx)
    _add_index_routes(app, ctx)
    # access control (serve/access.py: `api_keys` a key file, `public` paths, CORS, "10/s" limits), then
    # the telemetry around it, so refusals are counted and logged too; GET /metrics
    install_access(app, api_keys=api_keys, public=public, cors_origins=cors_origins, rate_limit=rate_limit)
    app.state.metrics = install_ops(app)
    ctx.batcher.on_batch = app.state.metrics.observe_batch  # /metrics: the batch-size histogram
    app.state.served = ctx
    app.state.bundle, app.state.index = ctx.model, ctx.index
    return app


def _load_served(bundle, index):
    """(the loaded bundle, the loaded index or None), the index checked against the bundle."""
    from ..bundle import load
    from .index import VectorIndex

    model = load(bundle) if isinstance(bundle, (str, os.PathLike)) else bundle
    idx = index if isinstance(index, VectorIndex) or index is None else VectorIndex.load(index)
    if idx is not None:
        idx.check_bundle(model)
    return model, idx


class _Served:
    """What the routes share: the bundle, the index, the limits, the model lock and the batcher.

    The bundle and index are loaded by `load()`; until it returns the routes that need them answer
    503 and /ready says why (a bundle of many encoders or a large index takes a while to load).
    """

    def __init__(self, bundle, index, max_upload_bytes: int, labels: list[str] | None, max_audio_seconds: float):
        from ..bundle.model import read_info

        self.source = (bundle, index)
        self.info = bundle.info if hasattr(bundle, "info") else read_info(bundle)
        self.bundle_path = getattr(bundle, "path", bundle)
        if index is not None and not hasattr(index, "search") and not os.path.isdir(index):
            raise AnybindError(f"{index} is not an index folder: build one with `anybind index`")
        self.model, self.index, self.max_upload_bytes = None, None, max_upload_bytes
        self.labels, self.default_labels = labels, list(labels or [])
        self.max_audio_seconds = max_audio_seconds
        image_side = (self.info["modalities"].get("image") or {}).get("preprocess") or {}
        self.min_side = image_side.get("resize")
        self.ready, self.load_error, self.batcher = threading.Event(), None, None
        self._lock = threading.Lock()

    def load(self, warmup: bool = False) -> None:
        """Load the bundle and index (and run each encoder once, if `warmup`); then the server is ready."""
        try:
            model, index = _load_served(*self.source)
            if warmup:
                _warm_up(model)
        except Exception as e:
            self.load_error = f"{type(e).__name__}: {e}"
            raise
        self.model, self.index = model, index
        self.default_labels = list(self.labels) if self.labels else model.default_labels
        self.ready.set()

    def need_model(self):
        """The loaded bundle, or a 503 (with Retry-After) while it loads."""
        if not self.ready.is_set():
            why = f"loading it failed: {self.load_error}" if self.load_error else "it is still loading"
            raise ApiError(503, f"the server is not ready: {why} (see /ready)", {"Retry-After": "1"})
        return self.model

    def _locked(self, fn, *args):
        with self._lock:
            return fn(*args)

    def encode_batch(self, modality: str, items: list):
        """One model call on a batch gathered by the batcher (under the model lock)."""
        return self._locked(self.model.encode, modality, items)

    async def encode(self, modality: str, items: list):
        """Embeddings of `items`, computed in a batch with other requests' (see `batching`)."""
        self.need_model()
        return await self.batcher.submit(modality, items)

    async def on_model(self, fn, *args):
        """Run a model call in the threadpool, one at a time (encoders are not re-entrant)."""
        from starlette.concurrency import run_in_threadpool

        self.need_model()
        return await run_in_threadpool(self._locked, fn, *args)

    async def image_of(self, form):
        """The uploaded image of a multipart form, decoded off the event loop."""
        from starlette.concurrency import run_in_threadpool

        return await run_in_threadpool(_decode_upload, *_upload(form, self.max_upload_bytes)[:2], self.min_side)

    async def item_of(self, form) -> tuple[str, Any]:
        """(modality, item) of the upload of a multipart form: a decoded image, or checked audio bytes."""
        from starlette.concurrency import run_in_threadpool

        data, name, ctype, part = _upload(form, self.max_upload_bytes)
        modality = _upload_modality(form, data, name, ctype, part)
        if modality not in self.info["modalities"]:
            raise ApiError(400, f"this bundle binds {', '.join(self.info['modalities'])}: it cannot read {modality} "
                                f"({name})" + (" - export a run trained with --add audio" if modality == "audio" else ""))
        if modality == "image":
            return modality, await run_in_threadpool(_decode_upload, data, name, self.min_side)
        if modality == "audio":
            return modality, await run_in_threadpool(_check_audio, data, name, self.max_audio_seconds)
        raise ApiError(400, f"uploads are images or audio, not {modality}")


def _add_error_handlers(app) -> None:
    """Every error is JSON {"error": ...} with a 4xx/5xx status; the server stays up."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return JSONResponse({"error": str(exc)}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(AnybindError)
    async def _anybind_error(request, exc: AnybindError):
        return JSONResponse({"error": str(exc)}, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        return JSONResponse({"error": detail}, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc):
        parts = [f"{'.'.join(str(x) for x in e.get('loc', ()) if x != 'body') or 'request'}: {e.get('msg')}"
                 for e in exc.errors()]
        return JSONResponse({"error": "; ".join(parts) or "invalid request"}, status_code=422)

    @app.exception_handler(Exception)
    async def _internal_error(request, exc):
        log.exception("error serving %s", request.url.path)
        return JSONResponse({"error": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)


#: Where the API docs' scripts and styles are served from (fastapi-offline's packaged copies).
DOCS_ASSETS = "/docs-assets"


def _add_docs_routes(app) -> None:
    """/docs (Swagger UI) and /redoc from packaged assets, so they work with no network (FastAPI's
    own pages load their scripts from a CDN and stay blank offline)."""
    from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
    from starlette.staticfiles import StaticFiles

    spec = importlib.util.find_spec("fastapi_offline")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError("the offline API docs (anybind serve /docs)", "fastapi-offline", "serve")
    assets = Path(next(iter(spec.submodule_search_locations))) / "static"
    app.mount(DOCS_ASSETS, StaticFiles(directory=assets), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def swagger():
        return get_swagger_ui_html(openapi_url=app.openapi_url, title="anybind API",
                                   swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
                                   swagger_favicon_url=f"{DOCS_ASSETS}/favicon.png")

    @app.get("/redoc", include_in_schema=False)
    async def redoc():
        return get_redoc_html(openapi_url=app.openapi_url, title="anybind API",
                              redoc_js_url=f"{DOCS_ASSETS}/redoc.standalone.js",
                              redoc_favicon_url=f"{DOCS_ASSETS}/favicon.png", with_google_fonts=False)


def _add_info_routes(app, ctx: _Served) -> None:
    """The web page, /health (liveness) and /ready (readiness)."""
    from fastapi.responses import HTMLResponse, JSONResponse

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse(_page(), headers={"Content-Security-Policy": PAGE_CSP, "X-Content-Type-Options": "nosniff"})

    @app.get("/health", summary="Liveness (answers while loading too), and what this server serves")
    async def health():
        idx, info = ctx.index, ctx.info
        return {"status": "ok", "ready": ctx.ready.is_set(), "bundle": str(ctx.bundle_path),
                "modalities": list(info["modalities"]), "dim": int(info["dim"]),
                "index": None if idx is None else {"kind": idx.kind, "count": len(idx), "modality": idx.modality,
                                                   "modalities": {m: idx.count(m) for m in idx.modalities},
                                                   "dataset": idx.info.get("dataset")},
                "default_labels": ctx.default_labels, "max_upload_bytes": ctx.max_upload_bytes,
                "max_audio_seconds": ctx.max_audio_seconds,
                "batching": {"max_batch": ctx.batcher.max_batch, "wait_ms": ctx.batcher.max_wait * 1000,
                             "model_threads": _model_threads(),
                             "done": {k: {"batches": b, "items": n, "model_seconds": round(t, 6)}
                                      for k, (b, n, t) in ctx.batcher.stats.items()}}}

    @app.get("/ready", summary="Readiness: 200 once the bundle and index are loaded, 503 before (or if loading failed)")
    async def ready():
        if ctx.ready.is_set():
            return {"ready": True}
        body = {"ready": False, "error": ctx.load_error} if ctx.load_error else {"ready": False, "loading": True}
        return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})


def _add_model_routes(app, ctx: _Served) -> None:
    """/embed and /classify: the bundle on texts and uploaded images."""
    from fastapi import Request
    from starlette.concurrency import run_in_threadpool

    @app.post("/embed", summary="Embed texts (JSON {\"texts\": [...]}) or one image or audio clip (multipart "
                                "field 'file')", openapi_extra=_EMBED_BODY)
    async def embed(request: Request):
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("application/json"):
            body = await _read_limited(request, FORM_SLACK + MAX_TEXTS * MAX_TEXT_CHARS * 4)
            texts = await run_in_threadpool(_texts_from_json, body)  # a 2 MiB body: parsed off the event loop
            emb = await ctx.encode("text", texts)
            return {"modality": "text", "dim": emb.shape[1], "embeddings": emb.tolist()}
        if ctype.startswith("multipart/form-data"):
            modality, item = await ctx.item_of(await _read_form(request, ctx.max_upload_bytes))
            emb = await ctx.encode(modality, [item])
            return {"modality": modality, "dim": emb.shape[1], "embeddings": emb.tolist()}
        raise ApiError(415, "send JSON {\"texts\": [\"a red bird\", ...]} (Content-Type: application/json) or an "
                            "image or audio clip as multipart/form-data in the field 'file'")

    @app.post("/classify", summary="Zero-shot labels of an uploaded image or audio clip (multipart: 'file', "
                                   "optional 'labels')", openapi_extra=_CLASSIFY_BODY)
    async def classify(request: Request):
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise ApiError(415, "send the image or audio clip as multipart/form-data in the field 'file' "
                                "(and optionally 'labels')")
        ctx.need_model()
        form = await _read_form(request, ctx.max_upload_bytes)
        names = _labels(form) or ctx.default_labels
        if not names:
            raise ApiError(400, "give the labels to classify into (form field 'labels': a JSON list, or one per line): "
                                "this bundle names no default classes")
        modality, item = await ctx.item_of(form)
        probs = await ctx.on_model(_classify, ctx.model, [item], names, modality)
        ranked = sorted(zip(names, probs[0].tolist(), strict=True), key=lambda t: -t[1])
        return {"modality": modality, "labels": [{"label": n, "probability": p} for n, p in ranked]}


def _classify(model, items: list, names: list[str], modality: str):
    return model.classify(items, names, modality=modality)


def _add_index_routes(app, ctx: _Served) -> None:
    """/search, /images/{item_id} and /audio/{item_id}: the index, and the files it lists (never a path joined)."""
    from fastapi import Request

    @app.get("/search", summary="The indexed items nearest a text query (rows of `modality`, default all)")
    async def search(request: Request, q: str = "", k: str = "10", modality: str = ""):
        idx = _need_index(ctx)
        q, kk, rows = _query(q), _k(k), _rows(modality, idx)
        vec = await ctx.encode("text", [q])
        return {"query": q, "k": kk, **await _ranked(ctx, vec, "text", kk, rows, str(request.base_url))}

    @app.post("/search", summary="The indexed items nearest an uploaded image or audio clip (multipart: 'file', "
                                 "optional 'k', 'modality' of the rows)", openapi_extra=_SEARCH_BODY)
    async def search_upload(request: Request):
        idx = _need_index(ctx)
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise ApiError(415, "send the image or audio clip as multipart/form-data in the field 'file' (and "
                                "optionally 'k' and 'modality'); a text query is GET /search?q=...")
        form = await _read_form(request, ctx.max_upload_bytes)
        kk, rows = _k(_form_text(form, "k") or "10"), _rows(_form_text(form, "modality") or "", idx)
        query, item = await ctx.item_of(form)
        vec = await ctx.encode(query, [item])
        return {"query": {"modality": query}, "k": kk, **await _ranked(ctx, vec, query, kk, rows, str(request.base_url))}

    @app.get("/images/{item_id:path}", summary="An indexed image (only items the index lists)")
    def image(item_id: str):
        idx = _need_index(ctx)
        ref = idx.reference(item_id, "image") if "image" in idx.modalities else None
        if ref is None:
            raise ApiError(404, f"no indexed image has the id {item_id!r}")
        return _image_response(item_id, ref)

    @app.get("/audio/{item_id:path}", summary="An indexed audio clip (only items the index lists)")
    def audio(item_id: str, sub: str = "0"):
        idx = _need_index(ctx)
        ref = idx.reference(item_id, "audio", _sub(sub)) if "audio" in idx.modalities else None
        if ref is None:
            raise ApiError(404, f"no indexed audio clip has the id {item_id!r} (number {sub})")
        return _audio_response(item_id, ref)


def _need_index(ctx: _Served):
    """The loaded index; 404 when the server has none, 503 while it loads."""
    if ctx.source[1] is None:
        raise ApiError(404, "this server has no index: build one with `anybind index` and start it with --index")
    ctx.need_model()
    return ctx.index


async def _ranked(ctx: _Served, vec, query: str, k: int, rows: str | None, base: str) -> dict:
    """The search results of a query vector of modality `query` (offsets applied across sides only)."""
    from starlette.concurrency import run_in_threadpool

    from .index import corrections

    idx = ctx.index
    hits = await run_in_threadpool(idx.search, vec, k, corrections(ctx.model, query, idx.modalities), rows)
    return {"modality": rows or "all", "results": _search_results(hits, base)}


def _rows(modality: str, idx) -> str | None:
    """The indexed modality a search looks at (None: all of them)."""
    modality = (modality or "").strip()
    if modality in ("", "all"):
        return None
    if modality not in idx.modalities:
        raise ApiError(400, f"modality must be one of {', '.join(idx.modalities)} or all (the rows this index holds), "
                            f"not {modality[:40]!r}")
    return modality


def _sub(sub: str) -> int:
    try:
        return int(sub)
    except ValueError:
        raise ApiError(400, f"sub must be an integer (the clip's number), not {sub[:20]!r}") from None


def _form_text(form, name: str) -> str | None:
    value = form.get(name)
    return value if isinstance(value, str) else None


def _query(q: str) -> str:
    q = q.strip()
    if not q:
        raise ApiError(400, "the query is empty: give some words, e.g. /search?q=a+red+bird")
    if len(q) > MAX_TEXT_CHARS:
        raise ApiError(400, f"the query is too long ({len(q)} characters; at most {MAX_TEXT_CHARS})")
    return q


def _k(k: str) -> int:
    """The number of results asked for: an integer from 1 to MAX_K (a query string, so text)."""
    try:
        kk = int(k)
    except ValueError:
        kk = 0
    if not 1 <= kk <= MAX_K:
        raise ApiError(400, f"k must be an integer from 1 to {MAX_K}, not {k!r}")
    return kk


def _search_results(hits, base: str) -> list[dict]:
    """Rows of one query's hits; the server's file paths stay on the server."""
    results = []
    for r, sub in zip(hits.records(), hits.subs[0] if hits.subs else [0] * len(hits.ids[0]), strict=True):
        modality = r["modality"]
        row = {"rank": r["rank"], "item_id": r["item_id"], "score": r["score"], "modality": modality}
        if modality == "image":
            row["image_url"] = base + "images/" + quote(r["item_id"], safe="/")
        elif modality == "audio":
            row["audio_url"] = base + "audio/" + quote(r["item_id"], safe="/") + f"?sub={sub}"
        else:
            row[modality] = r["path"]  # a text gallery: the text itself
        results.append(row)
    return results


_MEDIA_HEADERS = {"X-Content-Type-Options": "nosniff", "Cache-Control": "public, max-age=3600"}


def _local_file(item_id: str, ref: str, kind: str):
    """The indexed file itself when it is a local file of media type `kind`/*, else None."""
    from fastapi.responses import FileResponse

    local = ref[len("file://"):] if ref.startswith("file://") else None if "://" in ref else ref
    if local is None:
        return None
    if not os.path.isfile(local):
        raise ApiError(404, f"the indexed file of {item_id!r} is gone: rebuild the index")
    ctype = mimetypes.guess_type(local)[0] or ""
    if ctype.startswith(kind + "/") and ctype != "image/svg+xml":
        return FileResponse(local, media_type=ctype, headers=_MEDIA_HEADERS)
    return None


def _image_response(item_id: str, ref: str):
    """A local image file as it is; anything else (tar://, idx://, odd types) decoded to a PNG."""
    from fastapi.responses import Response

    headers = _MEDIA_HEADERS
    if (as_is := _local_file(item_id, ref, "image")) is not None:
        return as_is
    from ..data.images import load_image

    try:
        img = load_image(ref)
    except DataError as e:
        raise ApiError(404, f"the indexed image of {item_id!r} cannot be read: {e}") from e
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return Response(buf.getvalue(), media_type="image/png", headers=headers)


def _audio_response(item_id: str, ref: str):
    """A local audio file as it is; anything else (tar://) decoded and sent as 16-bit WAV."""
    from fastapi.responses import Response

    headers = _MEDIA_HEADERS
    if (as_is := _local_file(item_id, ref, "audio")) is not None:
        return as_is
    import soundfile

    from ..data.audio import load_audio

    try:
        samples = load_audio(ref, 16000)
    except DataError as e:
        raise ApiError(404, f"the indexed audio of {item_id!r} cannot be read: {e}") from e
    buf = io.BytesIO()
    soundfile.write(buf, samples, 16000, format="WAV", subtype="PCM_16")
    return Response(buf.getvalue(), media_type="audio/wav", headers=headers)


def serve(bundle, index=None, host: str = "127.0.0.1", port: int = 8000, max_upload_mb: float = 10,
          labels: list[str] | None = None, warmup: bool = True, log_level: str = "info",
          max_audio_seconds: float = DEFAULT_MAX_AUDIO_SECONDS, max_batch: int = DEFAULT_MAX_BATCH,
          batch_wait_ms: float = DEFAULT_MAX_WAIT_MS, api_key_file=None, public=None, cors_origins=(),
          rate_limit=None, access_log: str | None = None, shutdown_timeout: float = 30.0,
          threads: int | None = None) -> None:
    """Run the API and page with uvicorn until interrupted.

    `threads`: torch's intra-op threads for the model (default: one core fewer than this process
    may use, at least 1). The event loop, request parsing and search need a core of their own: a
    torch parallel region waits for its slowest thread, so one preempted model thread stalls the
    whole forward (measured on 2 cores, text search, 16 clients, batched: 2 threads 141 req/s, 1 186).

    The server listens at once (/health answers) while a thread loads the bundle and index and, if
    `warmup`, runs each encoder once; /ready answers 200 only after that. If loading fails the
    server stops and the error is raised here. On SIGTERM or Ctrl-C it stops accepting connections,
    finishes the requests in flight (for up to `shutdown_timeout` seconds) and returns.
    `access_log` ("-": stderr, or a file) takes JSON access lines instead of uvicorn's.
    """
    uvicorn = require("uvicorn", "the HTTP server (anybind serve)", "uvicorn", extra="serve")
    previous_threads = _set_model_threads(threads)  # restored on return: a process-wide setting
    app = create_app(bundle, index, max_upload_bytes=int(max_upload_mb * 2**20), labels=labels,
                     max_audio_seconds=max_audio_seconds, load=False, max_batch=max_batch, batch_wait_ms=batch_wait_ms,
                     api_keys=api_key_file, public=public, cors_origins=cors_origins, rate_limit=rate_limit)
    if not float(shutdown_timeout) > 0:
        raise AnybindError("the shutdown timeout must be positive seconds (--shutdown-timeout)")
    if access_log:
        configure_access_log(access_log)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=not access_log,
                                           timeout_graceful_shutdown=shutdown_timeout))
    ctx = app.state.served
    failed: list[BaseException] = []

    def load() -> None:
        try:
            ctx.load(warmup=warmup)
            app.state.bundle, app.state.index = ctx.model, ctx.index
            print(f"anybind: ready: {ctx.bundle_path}" + (f" with the index {index}" if index else ""), flush=True)
        except Exception as e:  # noqa: BLE001 - reported by /ready, then raised below
            failed.append(e)
            server.should_exit = True

    threading.Thread(target=load, name="anybind-load", daemon=True).start()
    print(f"anybind: serving {ctx.bundle_path} at http://{host}:{port}/  (API docs: /docs; loading, see /ready)",
          flush=True)
    try:
        with sigterm_ends_cleanly():
            server.run()
    finally:
        _set_model_threads(previous_threads)
    if failed:
        raise failed[0]


def _model_threads() -> int | None:
    """torch's intra-op threads, if torch is loaded (the model's share of the cores while it runs)."""
    import sys

    torch = sys.modules.get("torch")
    return None if torch is None else torch.get_num_threads()


def _set_model_threads(threads: int | None) -> int:
    """Set torch's intra-op threads (default: the cores less one); the previous count."""
    import torch

    if threads is not None and int(threads) < 1:
        raise AnybindError(f"--threads must be at least 1, not {threads}")
    previous = torch.get_num_threads()
    torch.set_num_threads(int(threads) if threads else max(1, len(os.sched_getaffinity(0)) - 1))
    return previous


def _warm_up(model) -> None:
    """Run each encoder once: its loading is paid before the first request, not during it."""
    import numpy as np

    if "text" in model.modalities:
        model.encode_text(["warm up"])
    if "image" in model.modalities:
        model.encode_image([np.full((32, 32, 3), 255, np.uint8)])
    if "audio" in model.modalities:  # a quarter second of a 440 Hz tone
        model.encode_audio(0.3 * np.sin(np.arange(4000, dtype=np.float32) * (2 * np.pi * 440 / 16000)))


# ---- request parsing ------------------------------------------------------------------------------------
async def _read_limited(request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes (never read whole first)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the upload is too large ({int(declared) / 2**20:.1f} MiB; the limit is "
                            f"{limit / 2**20:.1f} MiB)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the upload is too large (over the limit of {limit / 2**20:.1f} MiB)")
        chunks.append(chunk)
    return b"".join(chunks)


async def _read_form(request, max_upload_bytes: int):
    """Parse a multipart body read with a limit (the image itself is checked in `_upload`)."""
    from starlette.requests import Request

    body = await _read_limited(request, max_upload_bytes + FORM_SLACK)
    sent = False

    async def replay():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        return await Request(request.scope, replay).form(max_files=4, max_fields=MAX_LABELS + 8, max_part_size=FORM_SLACK)
    except Exception as e:  # noqa: BLE001 - malformed multipart: the client's fault
        raise ApiError(400, f"malformed multipart form: {e}") from e


def _upload(form, max_upload_bytes: int) -> tuple[bytes, str, str, str]:
    """(bytes, filename, content type, part name) of the upload in field 'file' (or 'image', 'audio')."""
    part = next((n for n in ("file", "image", "audio") if form.get(n) is not None and not isinstance(form.get(n), str)),
                None)
    if part is None:
        raise ApiError(400, "no image or audio clip: send it as a file in the multipart field 'file'")
    up = form.get(part)
    data = up.file.read(max_upload_bytes + 1)
    if len(data) > max_upload_bytes:
        raise ApiError(413, f"the file is too large (over the limit of {max_upload_bytes / 2**20:.1f} MiB)")
    if not data:
        raise ApiError(400, "the uploaded file is empty")
    return data, up.filename or "upload", (getattr(up, "content_type", None) or "").lower(), part


#: how audio files begin (WAV, FLAC, OGG, MP3 with a tag, AIFF); an MP3 frame is checked apart
_AUDIO_MAGIC = ((0, b"RIFF", 8, b"WAVE"), (0, b"fLaC", 0, b""), (0, b"OggS", 0, b""), (0, b"ID3", 0, b""),
                (0, b"FORM", 8, b"AIF"))


def _upload_modality(form, data: bytes, name: str, ctype: str, part: str) -> str:
    """What an upload is: the form's 'type' field, the part's name, its type, its name, its bytes."""
    from ..data.audio import is_audio

    asked = form.get("type")
    if isinstance(asked, str) and asked.strip():
        if asked.strip() not in ("image", "audio"):
            raise ApiError(400, f"type must be image or audio (what the uploaded file is), not {asked.strip()[:40]!r}")
        return asked.strip()
    if part in ("image", "audio"):
        return part
    if ctype.startswith("audio/") or is_audio(name) or _looks_like_audio(data):
        return "audio"
    return "image"


def _looks_like_audio(data: bytes) -> bool:
    if any(data[a:a + len(x)] == x and data[b:b + len(y)] == y for a, x, b, y in _AUDIO_MAGIC):
        return True
    return len(data) > 2 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0  # an MPEG audio frame sync


def _check_audio(data: bytes, name: str, max_seconds: float) -> bytes:
    """The uploaded audio bytes, once they decode to usable audio no longer than `max_seconds`
    (decoded as `load_audio` decodes a file; the bundle then reads the same bytes)."""
    from ..data.audio import load_audio

    rate = 16000
    try:
        samples = load_audio(data, rate)
    except DataError as e:
        if str(e).startswith("unreadable audio"):
            raise ApiError(415, f"{name} is not readable audio (send WAV, FLAC, OGG or MP3): {e}") from e
        raise ApiError(422, f"{name} is not usable audio: {e}") from e
    seconds = len(samples) / rate
    if seconds > max_seconds:
        raise ApiError(422, f"{name} is too long ({seconds:.1f} s; at most {max_seconds:g} s): send a shorter clip")
    return data


def _decode_upload(data: bytes, name: str, min_side: int | None) -> Any:
    """Decode uploaded bytes exactly as `load_image` decodes a file (reduced to the encoder's size)."""
    from PIL import UnidentifiedImageError

    from ..data.images import open_file, reduce_to, to_rgb

    try:
        return to_rgb(reduce_to(open_file(data, min_side, name=name), min_side))
    except DataError as e:
        raise ApiError(415, f"{name} is not a readable image: {e}") from e
    except UnidentifiedImageError as e:
        raise ApiError(415, f"{name} is not an image (unknown or corrupt format): send a PNG, JPEG, GIF, WebP "
                            "or BMP") from e
    except Exception as e:  # noqa: BLE001 - Pillow raises many types on a non-image
        raise ApiError(415, f"{name} is not an image (send a PNG, JPEG, GIF, WebP or BMP): "
                            f"{type(e).__name__}: {e}") from e


def _json_depth(raw: bytes) -> int:
    """How deep a JSON text's brackets nest (those inside strings skipped), found without
    recursion: counted over the brackets alone, in numpy, so a hostile body costs linear time."""
    import numpy as np

    marks = np.frombuffer(_NOT_BRACKET.sub(b"", _JSON_STRING.sub(b"", raw)), dtype=np.uint8)
    if not marks.size:
        return 0
    opens = (marks == ord("[")) | (marks == ord("{"))
    return int(np.cumsum(np.where(opens, 1, -1)).max())


def _parse_json(raw: bytes | str, what: str) -> Any:
    """`raw` parsed, refused with 400 when it is not JSON or nests deeper than MAX_JSON_DEPTH
    (checked on the raw bytes first: the parser recurses once per level)."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    depth = _json_depth(data)
    if depth > MAX_JSON_DEPTH:
        raise ApiError(400, f"{what} nests {depth} levels deep; at most {MAX_JSON_DEPTH} are accepted")
    try:
        return json.loads(data or b"null")
    except (ValueError, RecursionError) as e:
        raise ApiError(400, f"{what} is not valid JSON: {e}") from e


def _texts_from_json(body: bytes) -> list[str]:
    doc = _parse_json(body, "the body")
    texts = doc.get("texts") if isinstance(doc, dict) else None
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list) or not texts:
        raise ApiError(400, "send {\"texts\": [\"a red bird\", ...]}: a non-empty list of strings")
    if len(texts) > MAX_TEXTS:
        raise ApiError(413, f"too many texts ({len(texts)}; at most {MAX_TEXTS} a request)")
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise ApiError(400, f"texts[{i}] is empty or not a string: every text needs some words")
        if len(t) > MAX_TEXT_CHARS:
            raise ApiError(400, f"texts[{i}] is too long ({len(t)} characters; at most {MAX_TEXT_CHARS})")
    return texts


def _labels(form) -> list[str]:
    """Labels from repeated 'labels' fields, a JSON list, or one per line (commas also split one line)."""
    values = [v for v in form.getlist("labels") if isinstance(v, str)]
    out: list[str] = []
    for v in values:
        v = v.strip()
        if v.startswith("["):
            parsed = _parse_json(v, "labels: the JSON list")
            if not isinstance(parsed, list) or not all(isinstance(x, str) for x in parsed):
                raise ApiError(400, "labels: give a JSON list of strings")
            out += parsed
        else:
            lines = v.splitlines()
            out += [p for line in lines for p in (line.split(",") if len(lines) == 1 else [line])]
    out = list(dict.fromkeys(x.strip() for x in out if x.strip()))  # unique, in order
    if len(out) > MAX_LABELS:
        raise ApiError(413, f"too many labels ({len(out)}; at most {MAX_LABELS})")
    if any(len(x) > 200 for x in out):
        raise ApiError(400, "a label is longer than 200 characters")
    return out


def _page() -> str:
    return resources.files(__package__).joinpath("page.html").read_text("utf-8")


def _version() -> str:
    from .. import __version__

    return __version__


_IMAGE_PART = {"type": "string", "format": "binary",
               "description": "the image (PNG, JPEG, ...) or audio clip (WAV, FLAC, OGG, MP3)"}
_TYPE_PART = {"type": "string", "enum": ["image", "audio"],
              "description": "what the file is (default: from its type, name and first bytes)"}
_EMBED_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"type": "object", "required": ["texts"], "properties": {
        "texts": {"type": "array", "items": {"type": "string"}, "example": ["a red bird"]}}}},
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
        "file": _IMAGE_PART, "type": _TYPE_PART}}},
}}}
_CLASSIFY_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
        "file": _IMAGE_PART, "type": _TYPE_PART,
        "labels": {"type": "string", "description": "a JSON list, or one label per line (default: the bundle's classes)"}}}},
}}}
_SEARCH_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
        "file": _IMAGE_PART, "type": _TYPE_PART, "k": {"type": "integer", "default": 10},
        "modality": {"type": "string", "description": "the indexed modality to search (default: all)"}}}},
}}}

__all__ = ["ApiError", "create_app", "serve"]

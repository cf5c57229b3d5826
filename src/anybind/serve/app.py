"""The HTTP API and web page of a bundle (and an index): `anybind serve`.

    app = create_app("bundles/clipart", index="indexes/clipart")   # any ASGI server runs it
    serve("bundles/clipart", index="indexes/clipart", port=8000)   # or uvicorn, here

Routes: ``POST /embed`` (JSON ``{"texts": [...]}`` or a multipart image upload) -> embeddings;
``POST /classify`` (an image upload, optional ``labels``) -> zero-shot labels, most likely first;
``GET /search?q=...&k=10`` (with an index) -> items with score and image URL;
``GET /images/{item_id}`` -> an indexed image (only items the index lists: an id is looked up,
never joined to a path); ``GET /health``; ``GET /`` the web page; OpenAPI docs at ``/docs``.

Why it is built this way: every error is a 4xx/5xx JSON ``{"error": message}`` and never takes
the server down; uploads are read with a size limit before anything decodes them; model calls
run in the threadpool behind one lock (encoders are not re-entrant), so the event loop keeps
answering /health, static images and queued requests while a model works.
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
from typing import Any
from urllib.parse import quote

from .._deps import require
from ..errors import AnybindError, DataError, MissingDependencyError

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
PAGE_CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
            "script-src 'self' 'unsafe-inline'; connect-src 'self'; object-src 'none'; base-uri 'none'")


class ApiError(AnybindError):
    """A request the API refuses: `status` is the HTTP status, the message says what to send."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _fastapi():
    return require("fastapi", "the HTTP API (anybind serve)", "fastapi", extra="serve")


def create_app(bundle, index=None, max_upload_bytes: int = DEFAULT_MAX_UPLOAD, labels: list[str] | None = None):
    """A FastAPI app serving `bundle` (a folder or a loaded bundle) and optionally `index`.

    `labels` replaces the bundle's default zero-shot classes (`Bundle.default_labels`)
    for /classify requests that give none, and for the page's editable label list.
    """
    fastapi = _fastapi()
    if not any(importlib.util.find_spec(m) for m in ("python_multipart", "multipart")):
        raise MissingDependencyError("image uploads (anybind serve)", "python-multipart", "serve")
    if int(max_upload_bytes) < 1:
        raise AnybindError("the upload limit must be positive (--max-upload-mb)")
    ctx = _Served(*_load_served(bundle, index), int(max_upload_bytes), labels)
    app = fastapi.FastAPI(
        title="anybind", version=_version(),
        description=f"Embeddings, zero-shot classification and search with the bundle `{ctx.model.path}` "
                    f"({', '.join(ctx.model.modalities)}; {ctx.model.dim} dimensions).")
    _add_error_handlers(app)
    _add_info_routes(app, ctx)
    _add_model_routes(app, ctx)
    _add_index_routes(app, ctx)
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
    """What the routes share: the bundle, the index, the limits, and the one model lock."""

    def __init__(self, model, index, max_upload_bytes: int, labels: list[str] | None):
        self.model, self.index, self.max_upload_bytes = model, index, max_upload_bytes
        self.default_labels = list(labels) if labels else model.default_labels
        image_side = (model.info["modalities"].get("image") or {}).get("preprocess") or {}
        self.min_side = image_side.get("resize")
        self._lock = threading.Lock()

    def _locked(self, fn, *args):
        with self._lock:
            return fn(*args)

    async def on_model(self, fn, *args):
        """Run a model call in the threadpool, one at a time (encoders are not re-entrant)."""
        from starlette.concurrency import run_in_threadpool

        return await run_in_threadpool(self._locked, fn, *args)

    async def image_of(self, form):
        """The uploaded image of a multipart form, decoded off the event loop."""
        from starlette.concurrency import run_in_threadpool

        return await run_in_threadpool(_decode_upload, *_upload(form, self.max_upload_bytes), self.min_side)


def _add_error_handlers(app) -> None:
    """Every error is JSON {"error": ...} with a 4xx/5xx status; the server stays up."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

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


def _add_info_routes(app, ctx: _Served) -> None:
    """The web page and /health."""
    from fastapi.responses import HTMLResponse

    model, idx = ctx.model, ctx.index

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse(_page(), headers={"Content-Security-Policy": PAGE_CSP, "X-Content-Type-Options": "nosniff"})

    @app.get("/health", summary="Liveness, and what this server serves")
    async def health():
        return {"status": "ok", "bundle": str(model.path), "modalities": model.modalities, "dim": model.dim,
                "index": None if idx is None else {"kind": idx.kind, "count": len(idx), "modality": idx.modality,
                                                   "dataset": idx.info.get("dataset")},
                "default_labels": ctx.default_labels, "max_upload_bytes": ctx.max_upload_bytes}


def _add_model_routes(app, ctx: _Served) -> None:
    """/embed and /classify: the bundle on texts and uploaded images."""
    from fastapi import Request
    from starlette.concurrency import run_in_threadpool

    model = ctx.model

    @app.post("/embed", summary="Embed texts (JSON {\"texts\": [...]}) or one image (multipart field 'file')",
              openapi_extra=_EMBED_BODY)
    async def embed(request: Request):
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("application/json"):
            body = await _read_limited(request, FORM_SLACK + MAX_TEXTS * MAX_TEXT_CHARS * 4)
            texts = await run_in_threadpool(_texts_from_json, body)  # a 2 MiB body: parsed off the event loop
            emb = await ctx.on_model(model.encode_text, texts)
            return {"modality": "text", "dim": model.dim, "embeddings": emb.tolist()}
        if ctype.startswith("multipart/form-data"):
            image = await ctx.image_of(await _read_form(request, ctx.max_upload_bytes))
            emb = await ctx.on_model(model.encode_image, [image])
            return {"modality": "image", "dim": model.dim, "embeddings": emb.tolist()}
        raise ApiError(415, "send JSON {\"texts\": [\"a red bird\", ...]} (Content-Type: application/json) or an "
                            "image as multipart/form-data in the field 'file'")

    @app.post("/classify", summary="Zero-shot labels of an uploaded image (multipart: 'file', optional 'labels')",
              openapi_extra=_CLASSIFY_BODY)
    async def classify(request: Request):
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise ApiError(415, "send the image as multipart/form-data in the field 'file' (and optionally 'labels')")
        form = await _read_form(request, ctx.max_upload_bytes)
        names = _labels(form) or ctx.default_labels
        if not names:
            raise ApiError(400, "give the labels to classify into (form field 'labels': a JSON list, or one per line): "
                                "this bundle names no default classes")
        probs = await ctx.on_model(model.classify, [await ctx.image_of(form)], names)
        ranked = sorted(zip(names, probs[0].tolist(), strict=True), key=lambda t: -t[1])
        return {"labels": [{"label": n, "probability": p} for n, p in ranked]}


def _add_index_routes(app, ctx: _Served) -> None:
    """/search and /images/{item_id}: the index, and the images it lists (never a path joined)."""
    from fastapi import Request
    from starlette.concurrency import run_in_threadpool

    idx = ctx.index

    @app.get("/search", summary="The indexed items nearest a text query")
    async def search(request: Request, q: str = "", k: str = "10"):
        if idx is None:
            raise ApiError(404, "this server has no index: build one with `anybind index` and start it with --index")
        q, kk = _query(q), _k(k)
        vec = await ctx.on_model(ctx.model.encode_text, [q])
        hits = await run_in_threadpool(idx.search, vec, kk, idx.modality != "text")
        return {"query": q, "k": kk, "results": _search_results(hits, idx.modality, str(request.base_url))}

    @app.get("/images/{item_id:path}", summary="An indexed image (only items the index lists)")
    def image(item_id: str):
        ref = idx.reference(item_id) if idx is not None and idx.modality == "image" else None
        if ref is None:
            raise ApiError(404, f"no indexed image has the id {item_id!r}")
        return _image_response(item_id, ref)


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


def _search_results(hits, modality: str, base: str) -> list[dict]:
    """Rows of one query's hits; the server's file paths stay on the server."""
    results = []
    for r in hits.records():
        row = {"rank": r["rank"], "item_id": r["item_id"], "score": r["score"]}
        if modality == "image":
            row["image_url"] = base + "images/" + quote(r["item_id"], safe="/")
        else:
            row[modality] = r["path"]  # a text gallery: the text itself
        results.append(row)
    return results


def _image_response(item_id: str, ref: str):
    """A local image file as it is; anything else (tar://, idx://, odd types) decoded to a PNG."""
    from fastapi.responses import FileResponse, Response

    headers = {"X-Content-Type-Options": "nosniff", "Cache-Control": "public, max-age=3600"}
    local = ref[len("file://"):] if ref.startswith("file://") else None if "://" in ref else ref
    if local is not None:
        if not os.path.isfile(local):
            raise ApiError(404, f"the indexed file of {item_id!r} is gone: rebuild the index")
        ctype = mimetypes.guess_type(local)[0] or ""
        if ctype.startswith("image/") and ctype != "image/svg+xml":
            return FileResponse(local, media_type=ctype, headers=headers)
    from ..data.images import load_image

    try:
        img = load_image(ref)
    except DataError as e:
        raise ApiError(404, f"the indexed image of {item_id!r} cannot be read: {e}") from e
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return Response(buf.getvalue(), media_type="image/png", headers=headers)


def serve(bundle, index=None, host: str = "127.0.0.1", port: int = 8000, max_upload_mb: float = 10,
          labels: list[str] | None = None, warmup: bool = True, log_level: str = "info") -> None:
    """Run the API and page with uvicorn until interrupted (loads the encoders first, if `warmup`)."""
    uvicorn = require("uvicorn", "the HTTP server (anybind serve)", "uvicorn", extra="serve")
    app = create_app(bundle, index, max_upload_bytes=int(max_upload_mb * 2**20), labels=labels)
    if warmup:  # pay the encoders' loading before the first request, not during it
        import numpy as np

        model = app.state.bundle
        if "text" in model.modalities:
            model.encode_text(["warm up"])
        if "image" in model.modalities:
            model.encode_image([np.full((32, 32, 3), 255, np.uint8)])
    print(f"anybind: serving {app.state.bundle.path} at http://{host}:{port}/  (API docs: /docs)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


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


def _upload(form, max_upload_bytes: int) -> tuple[bytes, str]:
    """(bytes, filename) of the uploaded image in field 'file' (or 'image')."""
    up = form.get("file") or form.get("image")
    if up is None or isinstance(up, str):
        raise ApiError(400, "no image: send it as a file in the multipart field 'file'")
    data = up.file.read(max_upload_bytes + 1)
    if len(data) > max_upload_bytes:
        raise ApiError(413, f"the image is too large (over the limit of {max_upload_bytes / 2**20:.1f} MiB)")
    if not data:
        raise ApiError(400, "the uploaded file is empty")
    return data, up.filename or "upload"


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


_IMAGE_PART = {"type": "string", "format": "binary", "description": "the image (PNG, JPEG, ...)"}
_EMBED_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"type": "object", "required": ["texts"], "properties": {
        "texts": {"type": "array", "items": {"type": "string"}, "example": ["a red bird"]}}}},
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {"file": _IMAGE_PART}}},
}}}
_CLASSIFY_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
        "file": _IMAGE_PART,
        "labels": {"type": "string", "description": "a JSON list, or one label per line (default: the bundle's classes)"}}}},
}}}

__all__ = ["ApiError", "create_app", "serve"]

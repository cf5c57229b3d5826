"""Who may call the API, from which web pages, and how often: API keys, CORS and rate limits.

    app.add_middleware(AccessControl, keys=ApiKeys.load("keys.txt"), cors=Cors(["https://app.example"]),
                       rate=TokenBuckets(RateLimit.parse("10/s,burst=20")))

`AccessControl` is a pure ASGI middleware (no buffering, no task per request); `install_access`
puts it on an app from `create_app`'s arguments. Its answers are JSON ``{"error": ...}`` like
the rest of the API: 401 (no key, with ``WWW-Authenticate``), 403 (a key that is not valid, or a
preflight from an origin not allowed), 429 (over the rate limit, with ``Retry-After``).

Why it is built this way: a presented key is hashed with a per-process secret and its digest
compared with every key's, each with `hmac.compare_digest`, so the time taken says neither which
key matched nor how many characters did. Keys are read from a file (never the command line, which
`ps` shows) that only its owner may read. A request with a valid key is limited per key (one bucket
for a client behind many addresses), any other per client address (uvicorn resolves
``X-Forwarded-For`` from trusted proxies). Limits are per process: N workers allow N times the rate.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import re
import secrets
import stat
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from ..errors import AnybindError

#: where the middleware leaves the name of the request's valid key (None: none) for the access log
KEY_NAME_SCOPE = "anybind.key_name"
#: the paths open without a key unless --public says otherwise: probes must not need a secret
DEFAULT_PUBLIC = ("/health", "/ready")
#: never rate limited: health probes and metric scrapes must not get a 429
UNLIMITED = frozenset({"/health", "/ready", "/metrics"})
#: what making /docs or /redoc public also opens: the pages load these
_DOCS_COMPANIONS = {"/docs": ("/docs/oauth2-redirect", "/openapi.json", "/docs-assets/*"),
                    "/redoc": ("/openapi.json", "/docs-assets/*")}
MIN_KEY_CHARS = 16
_KEY_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_ORIGIN = re.compile(r"^https?://[^/\s?#]+$")
_UNITS = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600, "hour": 3600}
ALLOWED_METHODS = "GET, POST, OPTIONS"
ALLOWED_HEADERS = "Authorization, X-API-Key, Content-Type"
MAX_BUCKETS = 10_000


class AccessConfigError(AnybindError):
    """An API key file, CORS origin, public path or rate limit that cannot be used."""


# ---- API keys -----------------------------------------------------------------------------------------
class ApiKeys:
    """Named API keys; `name_of(presented)` is the key's name, or None, in time independent of both."""

    def __init__(self, named: dict[str, str]):
        if not named:
            raise AccessConfigError("no API keys given")
        self._secret = secrets.token_bytes(32)
        self._digests = [(self._digest(key), name) for name, key in named.items()]
        self.names = list(named)

    def _digest(self, key: str) -> bytes:
        return hmac.new(self._secret, key.encode("utf-8", "surrogateescape"), hashlib.sha256).digest()

    def name_of(self, presented: str) -> str | None:
        probe, found = self._digest(presented), None
        for digest, name in self._digests:  # every key compared, no early exit
            if hmac.compare_digest(probe, digest) and found is None:
                found = name
        return found

    @classmethod
    def load(cls, path: str | os.PathLike) -> ApiKeys:
        """Keys from a file: one a line, ``KEY`` or ``NAME:KEY``; blank lines and ``#`` comments skipped.
        Refused when missing, unreadable, readable by group or others, empty, or holding a short key."""
        return cls(parse_key_file(Path(path), _read_private(Path(path))))


def _read_private(path: Path) -> str:
    try:
        mode = path.stat().st_mode
        if not stat.S_ISREG(mode):
            raise AccessConfigError(f"the API key file {path} is not a file")
        if os.name == "posix" and mode & 0o077:
            raise AccessConfigError(f"the API key file {path} can be read or changed by other users (mode "
                                    f"{stat.filemode(mode)}): run chmod 600 {path}")
        return path.read_text("utf-8")
    except FileNotFoundError as e:
        raise AccessConfigError(f"the API key file {path} does not exist") from e
    except (OSError, UnicodeDecodeError) as e:
        raise AccessConfigError(f"the API key file {path} cannot be read: {e}") from e


def parse_key_file(path: Path, text: str) -> dict[str, str]:
    """{name: key} of a key file's text; a key with no name is named ``key-LINE``."""
    named: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, key = line.partition(":")
        name, key = (name.strip(), key.strip()) if sep else (f"key-{number}", name)
        where = f"{path}, line {number}"
        if not _KEY_NAME.match(name):
            raise AccessConfigError(f"{where}: a key's name is 1-64 letters, digits, '.', '_' or '-', not {name[:70]!r}")
        if len(key) < MIN_KEY_CHARS or any(c.isspace() for c in key):
            raise AccessConfigError(f"{where}: a key is at least {MIN_KEY_CHARS} characters with no spaces; make one "
                                    "with: python -c 'import secrets; print(secrets.token_urlsafe(32))'")
        if name in named:
            raise AccessConfigError(f"{where}: the name {name!r} is used twice")
        if key in named.values():
            raise AccessConfigError(f"{where}: this key is listed twice")
        named[name] = key
    if not named:
        raise AccessConfigError(f"the API key file {path} holds no key (one a line: KEY or NAME:KEY)")
    return named


def presented_key(headers: dict[str, str]) -> str | None:
    """The key a request carries: ``Authorization: Bearer KEY`` or ``X-API-Key: KEY`` (never the URL)."""
    scheme, _, token = headers.get("authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return headers.get("x-api-key", "").strip() or None


def parse_public(paths: str | Iterable[str] | None) -> tuple[str, ...]:
    """The public paths: a comma list or a list; ``PREFIX*`` opens a subtree; /docs and /redoc
    bring what their pages load (/openapi.json, /docs-assets/*)."""
    items = paths.split(",") if isinstance(paths, str) else list(paths or ())
    out: list[str] = []
    for p in (str(x).strip() for x in items):
        if not p:
            continue
        if not p.startswith("/") or any(c.isspace() for c in p):
            raise AccessConfigError(f"a public path starts with '/' (e.g. /health or /docs-assets/*), not {p!r}")
        out += [p, *_DOCS_COMPANIONS.get(p, ())]
    return tuple(dict.fromkeys(out))


def is_public(path: str, public: Iterable[str]) -> bool:
    return any(path.startswith(p[:-1]) if p.endswith("*") else path == p for p in public)


# ---- CORS ---------------------------------------------------------------------------------------------
class Cors:
    """The web origins whose pages may call the API (``*``: any), and the headers each answer gets."""

    def __init__(self, origins: Iterable[str]):
        self.origins = {str(o).strip().lower() for o in origins if str(o).strip()}
        bad = sorted(o for o in self.origins if o != "*" and not _ORIGIN.match(o))
        if bad:
            raise AccessConfigError(f"a CORS origin is scheme://host[:port] with no path or trailing '/', e.g. "
                                    f"https://app.example.com, not {bad[0]!r}")

    def allows(self, origin: str | None) -> bool:
        return bool(origin) and ("*" in self.origins or origin.lower() in self.origins)

    def headers(self, origin: str) -> list[tuple[bytes, bytes]]:
        """What an allowed origin's answers carry (Retry-After and WWW-Authenticate readable by its scripts)."""
        allow = "*" if "*" in self.origins else origin
        return [(b"access-control-allow-origin", allow.encode("latin-1")), (b"vary", b"Origin"),
                (b"access-control-expose-headers", b"Retry-After, WWW-Authenticate")]

    def preflight(self, origin: str) -> list[tuple[bytes, bytes]]:
        return [*self.headers(origin)[:2], (b"access-control-allow-methods", ALLOWED_METHODS.encode()),
                (b"access-control-allow-headers", ALLOWED_HEADERS.encode()), (b"access-control-max-age", b"600")]


# ---- rate limits --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RateLimit:
    """`per_second` requests a second on average, up to `burst` at once."""

    per_second: float
    burst: int

    @classmethod
    def parse(cls, text: str) -> RateLimit:
        """``10/s``, ``600/min``, ``1000/hour``, each with an optional ``,burst=N`` (default: one second's worth)."""
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*/\s*([a-z]+)\s*(?:,\s*burst\s*=\s*(\d+)\s*)?", str(text).lower())
        if not m or m.group(2) not in _UNITS or float(m.group(1)) <= 0 or (m.group(3) and int(m.group(3)) < 1):
            raise AccessConfigError(f"a rate limit is COUNT/UNIT with an optional burst, e.g. 10/s, 600/min or "
                                    f"2/s,burst=5 (units: s, min, hour), not {text!r}")
        per_second = float(m.group(1)) / _UNITS[m.group(2)]
        return cls(per_second, int(m.group(3)) if m.group(3) else max(1, math.ceil(per_second)))

    def describe(self) -> str:
        rate = f"{self.per_second:g} a second" if self.per_second >= 1 else f"{self.per_second * 60:g} a minute"
        return f"{rate} (bursts of {self.burst})"


class TokenBuckets:
    """One token bucket per caller: `take(who)` is 0 when a request may go, else the seconds to wait.
    Memory is bounded: past `max_buckets` callers the least recently seen is forgotten (a full bucket)."""

    def __init__(self, limit: RateLimit, clock: Callable[[], float] = time.monotonic, max_buckets: int = MAX_BUCKETS):
        self.limit, self.clock, self.max_buckets = limit, clock, max_buckets
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # who -> (tokens, when)

    def take(self, who: str) -> float:
        now, limit = self.clock(), self.limit
        tokens, then = self._buckets.pop(who, (float(limit.burst), now))
        tokens = min(float(limit.burst), tokens + (now - then) * limit.per_second)
        wait = 0.0 if tokens >= 1 else (1 - tokens) / limit.per_second
        self._buckets[who] = (tokens - 1 if wait == 0 else tokens, now)
        while len(self._buckets) > self.max_buckets:
            self._buckets.popitem(last=False)
        return wait


# ---- the middleware -----------------------------------------------------------------------------------
class AccessControl:
    """Pure ASGI middleware: CORS preflights answered, then the rate limit, then the API key."""

    def __init__(self, app, *, keys: ApiKeys | None = None, public: Iterable[str] = DEFAULT_PUBLIC,
                 cors: Cors | None = None, rate: TokenBuckets | None = None):
        self.app, self.keys, self.public, self.cors, self.rate = app, keys, tuple(public), cors, rate

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        origin = headers.get("origin")
        allowed = self.cors is not None and self.cors.allows(origin)
        if self.cors is not None and scope["method"] == "OPTIONS" and origin and \
                "access-control-request-method" in headers:
            if not allowed:
                return await _answer(send, 403, f"the origin {origin[:100]} may not call this API (--cors-origin)")
            return await _answer(send, 204, None, self.cors.preflight(origin))
        extra = self.cors.headers(origin) if allowed else []
        name, refusal = self._check(scope, headers)
        scope[KEY_NAME_SCOPE] = name
        if refusal is not None:
            status, message, more = refusal
            return await _answer(send, status, message, extra + more)
        await self.app(scope, receive, _adding_headers(send, extra) if extra else send)

    def _check(self, scope, headers: dict[str, str]) -> tuple[str | None, tuple | None]:
        """(the valid key's name or None, None or (status, message, headers) of a refusal)."""
        key = presented_key(headers) if self.keys is not None else None
        name = self.keys.name_of(key) if key is not None else None
        path = scope["path"]
        if self.rate is not None and path not in UNLIMITED:
            who = f"key:{name}" if name else f"addr:{(scope.get('client') or ('unknown',))[0]}"
            wait = self.rate.take(who)
            if wait > 0:
                per = "API key" if name else "client address"
                return name, (429, f"too many requests: the limit is {self.rate.limit.describe()} per {per}; retry "
                                   f"in {wait:.2f} s", [(b"retry-after", str(math.ceil(wait)).encode())])
        if self.keys is None or is_public(path, self.public):
            return name, None
        if key is None:
            return None, (401, "this API needs a key: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'",
                          [(b"www-authenticate", b'Bearer realm="anybind"')])
        if name is None:
            return None, (403, "the API key is not valid", [])
        return name, None


def _adding_headers(send, extra: list[tuple[bytes, bytes]]):
    async def wrapped(message):
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), *extra]}
        await send(message)
    return wrapped


async def _answer(send, status: int, message: str | None, headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = b"" if message is None else json.dumps({"error": message}).encode()
    base = [(b"content-type", b"application/json")] if body else []
    await send({"type": "http.response.start", "status": status,
                "headers": [*base, (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


def install_access(app, *, api_keys=None, public=None, cors_origins=(), rate_limit=None) -> None:
    """Put `AccessControl` on `app` when any of it is asked for: `api_keys` a key file (or `ApiKeys`),
    `public` paths open without a key (default /health, /ready), `cors_origins`, `rate_limit` ("10/s")."""
    keys = api_keys if isinstance(api_keys, ApiKeys) or api_keys is None else ApiKeys.load(api_keys)
    cors = Cors(cors_origins) if cors_origins else None
    limit = rate_limit if isinstance(rate_limit, RateLimit) or rate_limit is None else RateLimit.parse(rate_limit)
    if keys is None and cors is None and limit is None:
        return
    public = parse_public(DEFAULT_PUBLIC if public is None else public)
    app.add_middleware(AccessControl, keys=keys, public=public, cors=cors, rate=None if limit is None else TokenBuckets(limit))
    if keys is not None:
        _document_keys(app, public)


def _document_keys(app, public: tuple[str, ...]) -> None:
    """The OpenAPI schema says how to send a key, so /docs has an Authorize button that sends it."""
    build = app.openapi

    def openapi():
        if app.openapi_schema is None:
            schema = build()
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer KEY"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}}
            schema["security"] = [{"bearer": []}, {"apiKey": []}]
            for path, operations in schema.get("paths", {}).items():
                if is_public(path, public):
                    for operation in operations.values():
                        operation["security"] = []
        return app.openapi_schema

    app.openapi = openapi

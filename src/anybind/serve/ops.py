"""Operating the server: Prometheus metrics at /metrics and structured (JSON) access logs.

    metrics = install_ops(app)              # the telemetry middleware and GET /metrics
    metrics.observe_batch("text", 12)       # the micro-batcher reports each model call's size
    configure_access_log("-")               # JSON lines on stderr (or a file path)

Metrics (Prometheus text format 0.0.4): ``anybind_http_requests_total{route,method,status}``,
``anybind_http_request_duration_seconds{route}`` (a histogram), ``anybind_http_errors_total{route,status}``
(5xx answers, and requests that failed before answering), ``anybind_http_requests_in_flight`` and
``anybind_batch_size{modality}`` (a histogram of model-call batch sizes).

Why it is built this way: the route label is the route's template (``/images/{item_id}``), never the
raw path, so a scan of random URLs cannot grow the series without bound (unknown paths are
``unmatched``); the exposition is written here (a few dozen lines) rather than adding a dependency;
an access line holds the path without its query string (values may be private) and the API key's
name, never the key.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import sys
import threading
import time
from datetime import datetime, timezone

from ..errors import AnybindError
from .access import KEY_NAME_SCOPE

ACCESS_LOG = logging.getLogger("anybind.access")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _number(value: float) -> str:
    """A sample value or bucket bound as Prometheus writes it (1.0, 0.005, +Inf)."""
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _labels(names: tuple[str, ...], values: tuple) -> str:
    def escape(v) -> str:
        return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    return "{" + ",".join(f'{n}="{escape(v)}"' for n, v in zip(names, values)) + "}" if names else ""


class _Histogram:
    """Cumulative buckets, sum and count per label set."""

    def __init__(self, bounds):
        self.bounds = (*map(float, bounds), math.inf)
        self.series: dict[tuple, list] = {}  # labels -> [bucket counts..., sum, count]

    def observe(self, labels: tuple, value: float) -> None:
        row = self.series.setdefault(labels, [0] * len(self.bounds) + [0.0, 0])
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                row[i] += 1  # cumulative: every bucket at or above the value
        row[-2] += value
        row[-1] += 1

    def lines(self, name: str, names: tuple[str, ...]) -> list[str]:
        out = []
        for labels, row in sorted(self.series.items()):
            for bound, count in zip(self.bounds, row):
                out.append(f"{name}_bucket{_labels((*names, 'le'), (*labels, _number(bound)))} {count}")
            out += [f"{name}_sum{_labels(names, labels)} {_number(row[-2])}", f"{name}_count{_labels(names, labels)} {row[-1]}"]
        return out


class Metrics:
    """The server's counters and histograms; thread-safe (model calls report from the threadpool)."""

    def __init__(self, prefix: str = "anybind"):
        self.prefix = prefix
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, str], int] = {}  # (route, method, status) -> count
        self.errors: dict[tuple[str, str], int] = {}  # (route, status) -> count
        self.latency = _Histogram(LATENCY_BUCKETS)
        self.batches = _Histogram(BATCH_BUCKETS)
        self.in_flight = 0

    def started(self) -> None:
        with self._lock:
            self.in_flight += 1

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        with self._lock:
            self.in_flight -= 1
            key = (route, method, str(status))
            self.requests[key] = self.requests.get(key, 0) + 1
            if status >= 500:
                self.errors[(route, str(status))] = self.errors.get((route, str(status)), 0) + 1
            self.latency.observe((route,), seconds)

    def observe_batch(self, modality: str, size: int) -> None:
        """One model call on `size` items of `modality` (the micro-batcher calls this)."""
        with self._lock:
            self.batches.observe((str(modality),), float(size))

    def exposition(self) -> str:
        """Every metric in the Prometheus text format."""
        p = self.prefix
        with self._lock:
            counters = [(f"{p}_http_requests_total", "HTTP requests answered", ("route", "method", "status"), self.requests),
                        (f"{p}_http_errors_total", "HTTP requests that failed on the server (5xx)", ("route", "status"),
                         self.errors)]
            out: list[str] = []
            for name, help_text, names, series in counters:
                out += [f"# HELP {name} {help_text}", f"# TYPE {name} counter"]
                out += [f"{name}{_labels(names, k)} {v}" for k, v in sorted(series.items())]
            out += [f"# HELP {p}_http_requests_in_flight HTTP requests being answered now",
                    f"# TYPE {p}_http_requests_in_flight gauge", f"{p}_http_requests_in_flight {self.in_flight}"]
            for name, help_text, label, hist in (
                    (f"{p}_http_request_duration_seconds", "time to answer an HTTP request", "route", self.latency),
                    (f"{p}_batch_size", "items per model call", "modality", self.batches)):
                out += [f"# HELP {name} {help_text}", f"# TYPE {name} histogram", *hist.lines(name, (label,))]
        return "\n".join(out) + "\n"


def _route_of(scope, routes) -> str:
    """The template of the route that served (or would serve) the request; ``unmatched`` if none."""
    route = scope.get("route")
    if route is None:  # refused before routing (401, 429): find the route it asked for
        from starlette.routing import Match

        route = next((r for r in routes if r.matches(scope)[0] != Match.NONE), None)
    return getattr(route, "path", None) or "unmatched"


class RequestTelemetry:
    """Pure ASGI middleware: times each HTTP request, counts it in `metrics`, logs one JSON access line."""

    def __init__(self, app, *, metrics: Metrics, routes=(), logger: logging.Logger = ACCESS_LOG):
        self.app, self.metrics, self.routes, self.logger = app, metrics, routes, logger

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, answer = time.perf_counter(), {"status": 500, "bytes": 0}

        async def counting(message):
            if message["type"] == "http.response.start":
                answer["status"] = message["status"]
            elif message["type"] == "http.response.body":
                answer["bytes"] += len(message.get("body", b""))
            await send(message)

        self.metrics.started()
        try:
            await self.app(scope, receive, counting)
        finally:
            seconds = time.perf_counter() - start
            route = _route_of(scope, self.routes)
            self.metrics.observe_request(route, scope["method"], answer["status"], seconds)
            self._log(scope, route, answer, seconds)

    def _log(self, scope, route: str, answer: dict, seconds: float) -> None:
        if not self.logger.isEnabledFor(logging.INFO):
            return
        record = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "method": scope["method"],
                  "path": scope["path"], "route": route, "status": answer["status"], "ms": round(seconds * 1000, 2),
                  "bytes": answer["bytes"], "client": (scope.get("client") or (None,))[0],
                  "key": scope.get(KEY_NAME_SCOPE)}
        self.logger.info(json.dumps(record), extra={"access": record})


def configure_access_log(target: str) -> logging.Handler:
    """Write access lines (one JSON object each) to `target`: ``-`` for stderr, else a file appended to."""
    try:
        handler = logging.StreamHandler(sys.stderr) if target == "-" else logging.FileHandler(target, encoding="utf-8")
    except OSError as e:
        raise AnybindError(f"the access log {target} cannot be opened: {e}") from e
    handler.setFormatter(logging.Formatter("%(message)s"))
    ACCESS_LOG.addHandler(handler)
    ACCESS_LOG.setLevel(logging.INFO)
    ACCESS_LOG.propagate = False
    return handler


def install_ops(app, metrics: Metrics | None = None) -> Metrics:
    """The telemetry middleware (outermost of those added so far) and ``GET /metrics`` on `app`."""
    from starlette.responses import Response

    metrics = metrics or Metrics()

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics():
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)

    app.add_middleware(RequestTelemetry, metrics=metrics, routes=app.router.routes)
    return metrics


@contextlib.contextmanager
def sigterm_ends_cleanly():
    """Within: a SIGTERM that uvicorn re-raises after its graceful shutdown ends nothing more, so
    the process exits 0 (a stop asked for and done), not killed by the signal."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)

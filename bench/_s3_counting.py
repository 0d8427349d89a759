"""A real S3-protocol server (moto) on loopback that counts the requests it serves.

Every request is classified as LIST / HEAD / GET / PUT / POST / DELETE and by *area*: the first
path component under the storage prefix (``synthesis``, ``adapters``, ``.tune``, ...), so a
benchmark or a test can say "n GETs of manifests per unit" without touching the code under test.
Counts are served at ``GET /__counts__`` and reset by ``POST /__reset__`` (JSON), so a server in
another process (the scale simulation keeps moto's CPU and memory out of the driver it measures)
reports the same way as one in a thread (tests).

    python bench/_s3_counting.py --port 9000    # serve until killed
"""

from __future__ import annotations

import argparse
import json
import threading
from collections import Counter
from typing import Any
from urllib.parse import parse_qs, unquote


def classify(method: str, path: str, query: str) -> tuple[str, str]:
    """(operation, key path inside the bucket) of one path-style S3 request."""
    parts = unquote(path).lstrip("/").split("/", 1)
    key = parts[1] if len(parts) > 1 else ""
    q = parse_qs(query, keep_blank_values=True)
    if method == "GET" and not key:
        return "LIST", (q.get("prefix") or [""])[0]
    op = {"GET": "GET", "HEAD": "HEAD", "PUT": "PUT", "POST": "POST", "DELETE": "DELETE"}.get(method, method)
    return op, key


def area_of(key: str, prefix: str) -> str:
    """The first path component below ``prefix`` (``synthesis``, ``adapters``, ...)."""
    rest = key[len(prefix):] if prefix and key.startswith(prefix) else key
    rest = rest.lstrip("/")
    return rest.split("/", 1)[0] or "(root)"


class Counts:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by_op: Counter[str] = Counter()
        self.by_area: Counter[tuple[str, str]] = Counter()
        self.keys: list[tuple[str, str]] = []
        self.prefix = ""
        self.keep_keys = False

    def add(self, op: str, key: str) -> None:
        with self.lock:
            self.by_op[op] += 1
            self.by_area[(op, area_of(key, self.prefix))] += 1
            if self.keep_keys:
                self.keys.append((op, key))

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            areas: dict[str, dict[str, int]] = {}
            for (op, area), n in sorted(self.by_area.items()):
                areas.setdefault(area, {})[op] = n
            out: dict[str, Any] = {"total": sum(self.by_op.values()), "ops": dict(sorted(self.by_op.items())),
                                   "areas": areas}
            if self.keep_keys:
                out["keys"] = list(self.keys)
            return out

    def reset(self, prefix: str = "", keep_keys: bool = False) -> None:
        with self.lock:
            self.by_op.clear()
            self.by_area.clear()
            self.keys.clear()
            self.prefix = prefix.strip("/")
            self.keep_keys = keep_keys


def counting_app(counts: Counts):
    """moto's WSGI app wrapped with the counter and the two control endpoints."""
    from moto.server import DomainDispatcherApplication, create_backend_app

    app = DomainDispatcherApplication(create_backend_app)

    def wsgi(environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path in ("/__counts__", "/__reset__"):
            if path == "/__reset__":
                size = int(environ.get("CONTENT_LENGTH") or 0)
                body = json.loads(environ["wsgi.input"].read(size) or b"{}") if size else {}
                counts.reset(body.get("prefix", ""), bool(body.get("keys")))
            data = json.dumps(counts.snapshot()).encode()
            start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
            return [data]
        op, key = classify(environ.get("REQUEST_METHOD", "GET"), path, environ.get("QUERY_STRING", ""))
        counts.add(op, key)
        return app(environ, start_response)

    return wsgi


class CountingS3Server:
    """moto + counter in a thread of this process (tests)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        import logging

        from werkzeug.serving import make_server

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
        self.counts = Counts()
        self.server = make_server(host, port, counting_app(self.counts), threaded=True)
        self.endpoint = f"http://{host}:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> "CountingS3Server":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()


def remote_counts(endpoint: str, reset_prefix: str | None = None, keys: bool = False) -> dict[str, Any]:
    """Counts of a server in another process; with ``reset_prefix`` also resets them."""
    import urllib.request

    if reset_prefix is None:
        with urllib.request.urlopen(f"{endpoint}/__counts__", timeout=30) as r:
            return json.loads(r.read())
    req = urllib.request.Request(f"{endpoint}/__reset__", data=json.dumps(
        {"prefix": reset_prefix, "keys": keys}).encode(), method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args()
    srv = CountingS3Server(args.host, args.port)
    print(srv.endpoint, flush=True)
    srv.server.serve_forever()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

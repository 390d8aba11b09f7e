"""An in-process stand-in for Google Cloud Storage for tests: fsspec's memory filesystem registered under
gs:// (what etils.epath reaches, as it would reach gcsfs) and the subset of the GCS JSON API that
TensorStore's `gcs` kvstore driver speaks over HTTP (object media upload, read with byte ranges and
generation conditions, metadata, list, delete), served from the same store on 127.0.0.1. TensorStore is
pointed at it with TENSORSTORE_GCS_HTTP_URL and a fixed token (GOOGLE_AUTH_TOKEN_FOR_TESTING), so orbax's
arrays and the epath files of a gs:// workdir land in one bucket and agree."""
from __future__ import annotations

import http.server
import importlib
import json
import threading
import urllib.parse

from fsspec.implementations.memory import MemoryFileSystem


class InMemoryGCS(MemoryFileSystem):
    """gs://bucket/key kept in this process's memory, keys without a leading slash as gcsfs gives them."""
    protocol = ("gs", "gcs")
    root_marker = ""
    store: dict = {}
    pseudo_dirs = [""]

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        for prefix in ("gs://", "gcs://"):
            if path.startswith(prefix):
                path = path[len(prefix):]
        return path.strip("/")


class _Objects:
    """The store seen as GCS objects: bytes and a generation per object name (bucket/name)."""

    def __init__(self):
        self.fs, self.generations, self.counter, self.lock = InMemoryGCS(), {}, 0, threading.Lock()

    def get(self, key):
        if key not in InMemoryGCS.store:
            return None, 0
        return InMemoryGCS.store[key].getvalue(), self.generations.setdefault(key, self._next())

    def _next(self):
        self.counter += 1
        return self.counter

    def put(self, key, data: bytes) -> int:
        self.fs.pipe_file(key, data)
        self.generations[key] = self._next()
        return self.generations[key]

    def delete(self, key):
        InMemoryGCS.store.pop(key, None)
        self.generations.pop(key, None)


def _meta(bucket, name, data, generation):
    return {"kind": "storage#object", "bucket": bucket, "name": name, "size": str(len(data)),
            "generation": str(generation), "metageneration": "1"}


class _Handler(http.server.BaseHTTPRequestHandler):
    objects: _Objects
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _reply(self, status, body=b"", headers=None, content_type="application/json"):
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _parse(self):
        url = urllib.parse.urlsplit(self.path)
        query = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query, keep_blank_values=True).items()}
        parts = url.path.split("/")
        return parts, query

    def _conditions_fail(self, query, generation) -> bool:
        match, not_match = query.get("ifGenerationMatch"), query.get("ifGenerationNotMatch")
        if match is not None and int(match) != generation:
            return True
        return not_match is not None and int(not_match) == generation

    def do_GET(self):  # noqa: N802
        with self.objects.lock:
            self._get()

    def _get(self):
        parts, query = self._parse()
        # /storage/v1/b/{bucket}[/o[/{object}]]
        if parts[1:4] != ["storage", "v1", "b"]:
            return self._reply(404, {"error": {"code": 404, "message": self.path}})
        bucket = parts[4]
        if len(parts) == 5:
            return self._reply(200, {"kind": "storage#bucket", "name": bucket})
        if len(parts) == 6:   # list
            return self._list(bucket, query)
        name = urllib.parse.unquote("/".join(parts[6:]))
        data, generation = self.objects.get(f"{bucket}/{name}")
        if data is None:
            return self._reply(404, {"error": {"code": 404, "message": "No such object"}})
        if self._conditions_fail(query, generation):
            return self._reply(412 if "ifGenerationMatch" in query else 304, b"")
        if query.get("alt") != "media":
            return self._reply(200, _meta(bucket, name, data, generation))
        headers = {"x-goog-generation": str(generation), "x-goog-metageneration": "1"}
        ranged = self.headers.get("Range")
        if ranged:
            start, _, end = ranged.split("=", 1)[1].partition("-")
            start = int(start) if start else max(len(data) - int(end), 0)
            end = min(int(end), len(data) - 1) if end and ranged.split("=", 1)[1][0] != "-" else len(data) - 1
            if start >= len(data):
                return self._reply(416, b"", headers)
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            return self._reply(206, data[start:end + 1], headers, "application/octet-stream")
        return self._reply(200, data, headers, "application/octet-stream")

    def _list(self, bucket, query):
        prefix = query.get("prefix", "")
        start, end = query.get("startOffset", ""), query.get("endOffset", "")
        items = []
        for key in sorted(InMemoryGCS.store):
            if not key.startswith(f"{bucket}/"):
                continue
            name = key[len(bucket) + 1:]
            if name.startswith(prefix) and name >= start and (not end or name < end):
                data, generation = self.objects.get(key)
                items.append(_meta(bucket, name, data, generation))
        return self._reply(200, {"kind": "storage#objects", "items": items})

    def do_POST(self):  # noqa: N802
        parts, query = self._parse()
        body = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
        # /upload/storage/v1/b/{bucket}/o?uploadType=media&name=...
        if parts[1:5] != ["upload", "storage", "v1", "b"] or query.get("uploadType") != "media":
            return self._reply(501, {"error": {"code": 501, "message": f"not served: POST {self.path}"}})
        bucket, name = parts[5], query["name"]
        with self.objects.lock:
            _, generation = self.objects.get(f"{bucket}/{name}")
            if self._conditions_fail(query, generation):
                return self._reply(412, {"error": {"code": 412, "message": "precondition"}})
            generation = self.objects.put(f"{bucket}/{name}", body)
        return self._reply(200, _meta(bucket, name, body, generation))

    def do_DELETE(self):  # noqa: N802
        parts, query = self._parse()
        bucket, name = parts[4], urllib.parse.unquote("/".join(parts[6:]))
        with self.objects.lock:
            data, generation = self.objects.get(f"{bucket}/{name}")
            if data is None:
                return self._reply(404, {"error": {"code": 404, "message": "No such object"}})
            if self._conditions_fail(query, generation):
                return self._reply(412, {"error": {"code": 412, "message": "precondition"}})
            self.objects.delete(f"{bucket}/{name}")
        return self._reply(204, b"")


class _FlatBucket:
    """What orbax asks google-cloud-storage about a bucket (gcs_utils.get_bucket): a flat namespace."""
    hierarchical_namespace_enabled = False

    def __init__(self, name):
        self.name = name


def storage_stub():
    """A `google.cloud.storage` module whose Client().get_bucket answers for the fake bucket: orbax imports
    google-cloud-storage only to ask whether a bucket has a hierarchical namespace."""
    import types
    module = types.ModuleType("google.cloud.storage")
    module.Client = type("Client", (), {"get_bucket": lambda self, name: _FlatBucket(name)})
    return module


class FakeGCS:
    """Registers InMemoryGCS for gs:// in fsspec and serves the same store over HTTP; `env` is what points
    TensorStore at it. Use as a context manager."""

    def __enter__(self):
        from etils.epath import backend
        self._registry = importlib.import_module("fsspec.registry")._registry
        self._before = dict(self._registry)
        importlib.import_module("fsspec").register_implementation("gs", InMemoryGCS, clobber=True)
        importlib.import_module("fsspec").register_implementation("gcs", InMemoryGCS, clobber=True)
        backend.fsspec_backend._get_filesystem.cache_clear()
        InMemoryGCS.store.clear()
        InMemoryGCS.pseudo_dirs[:] = [""]
        handler = type("Handler", (_Handler,), {"objects": _Objects()})
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        # TensorStore's gcs driver to this server with a fixed bearer token; google-cloud-storage (when
        # installed: orbax's bucket query) to the same server, as to the official emulator
        self.env = {"TENSORSTORE_GCS_HTTP_URL": self.url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake-token",
                    "STORAGE_EMULATOR_HOST": self.url}
        return self

    def __exit__(self, *exc):
        from etils.epath import backend
        self.server.shutdown()
        self.server.server_close()
        InMemoryGCS.store.clear()
        self._registry.clear()
        self._registry.update(self._before)
        backend.fsspec_backend._get_filesystem.cache_clear()

"""A local stand-in for the Hugging Face Hub: the routes huggingface_hub uses, served on 127.0.0.1.

Repos are folders on disk; dataset repos are added as "datasets/ORG/NAME". Model info with file metadata (sha256 of every "LFS" file), HEAD and
GET on resolve/{revision}/{path} with ETag, X-Repo-Commit and linked-size headers, Range requests,
and switches to make it fail the ways the real Hub can.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"
LFS_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".parquet", ".png", ".jpg")


def git_blob_id(data: bytes) -> str:
    """What the Hub names a plain (non-LFS) file by: its git blob id."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    def __init__(self):
        self.repos: dict[str, Path] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self.status_for: dict[str, int] = {}  # repo -> forced HTTP status (401, 403...)
        self.cut_once: set[str] = set()  # file paths whose next GET stops half-way
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def add(self, repo: str, folder: Path) -> None:
        self.repos[repo] = folder

    def files(self, repo: str) -> dict[str, Path]:
        root = self.repos[repo]
        out = {}
        for dirpath, _, names in os.walk(root, followlinks=True):
            for name in names:
                path = Path(dirpath) / name
                out[path.relative_to(root).as_posix()] = path
        return out

    def downloads(self, suffix: str = "") -> list[tuple[str, str, str | None]]:
        return [r for r in self.requests if r[0] == "GET" and "/resolve/" in r[1] and r[1].endswith(suffix)]

    def _handler(hub):  # noqa: N805 - the handler class closes over the hub
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, status: int, body: bytes = b"", headers: dict | None = None, error_code: str = ""):
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, str(v))
                if error_code:
                    self.send_header("X-Error-Code", error_code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _repo(self, parts: list[str], kind: str = "") -> str | None:
                repo = kind + "/".join(parts[:2])
                if repo in hub.status_for:
                    self._send(hub.status_for[repo], b'{"error": "denied"}', error_code="GatedRepo")
                    return None
                if repo not in hub.repos:
                    self._send(404, b'{"error": "Repository not found"}', error_code="RepoNotFound")
                    return None
                return repo

            def do_GET(self):
                self._route()

            def do_HEAD(self):
                self._route()

            def _route(self):
                path = unquote(urlparse(self.path).path)
                hub.requests.append((self.command, path, self.headers.get("Range")))
                parts = path.strip("/").split("/")
                if parts[:2] in (["api", "models"], ["api", "datasets"]):
                    repo = self._repo(parts[2:], "datasets/" if parts[1] == "datasets" else "")
                    if repo is not None:
                        self._info(repo)
                    return
                kind = ""
                if parts[0] == "datasets":
                    kind, parts = "datasets/", parts[1:]
                if len(parts) >= 5 and parts[2] == "resolve":
                    repo = self._repo(parts, kind)
                    if repo is not None:
                        self._file(repo, "/".join(parts[4:]))
                    return
                self._send(404, b"{}")

            def _info(self, repo: str):
                siblings = []
                for name, path in sorted(hub.files(repo).items()):
                    data = path.read_bytes()
                    entry = {"rfilename": name, "size": len(data), "blobId": git_blob_id(data)}
                    if name.endswith(LFS_SUFFIXES):
                        entry["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
                                        "pointerSize": 134}
                    siblings.append(entry)
                body = json.dumps({"id": repo.removeprefix("datasets/"), "modelId": repo, "sha": COMMIT,
                                   "siblings": siblings,
                                   "private": False, "gated": False, "tags": []}).encode()
                self._send(200, body, {"Content-Type": "application/json"})

            def _file(self, repo: str, name: str):
                files = hub.files(repo)
                if name not in files:
                    self._send(404, b'{"error": "Entry not found"}', error_code="EntryNotFound")
                    return
                data = files[name].read_bytes()
                lfs = name.endswith(LFS_SUFFIXES)
                etag = hashlib.sha256(data).hexdigest() if lfs else git_blob_id(data)
                headers = {"ETag": f'"{etag}"', "X-Repo-Commit": COMMIT, "Accept-Ranges": "bytes",
                           "Content-Type": "application/octet-stream"}
                if lfs:
                    headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": len(data)})
                if self.command == "HEAD":
                    self.send_response(200)
                    for k, v in headers.items():
                        self.send_header(k, str(v))
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    return
                start = 0
                if self.headers.get("Range", "").startswith("bytes="):
                    start = int(self.headers["Range"][6:].split("-")[0] or 0)
                body = data[start:]
                status = 206 if start else 200
                if start:
                    headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, str(v))
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if name in hub.cut_once:
                    hub.cut_once.discard(name)
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        return Handler

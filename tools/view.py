"""Serve the explanation viewer (viewer/) and the demo example images on loopback (`make view`).

    python -m tools.view [--port 8090]

The page talks to TorchServe straight from the browser, so TorchServe must allow this page's origin
(`cors_allowed_origin` in deploy/torchserve/local.properties is http://127.0.0.1:8090). Only the
standard library is used: the viewer needs nothing installed beyond Python.
"""

from __future__ import annotations

import argparse
import json
import os
import posixpath
import sys
import threading
from collections.abc import Sequence
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

REPO_ROOT = Path(__file__).resolve().parents[1]
VIEWER_DIR = REPO_ROOT / "viewer"
EXAMPLES_DIR = REPO_ROOT / "docs" / "examples"
EXAMPLES_PREFIX = "/examples/"
EXAMPLE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")
DEFAULT_PORT = 8090


def example_names(directory: Path = EXAMPLES_DIR) -> list[str]:
    if not directory.is_dir():
        return []
    return sorted(path.name for path in directory.iterdir() if path.suffix.lower() in EXAMPLE_SUFFIXES)


class ViewerRequestHandler(SimpleHTTPRequestHandler):
    """The page's files, plus /examples/ (the demo images, kept in docs/ where the README uses them)."""

    examples_dir = EXAMPLES_DIR
    quiet = False

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if urlsplit(self.path).path == EXAMPLES_PREFIX + "index.json":
            self._send_json(example_names(self.examples_dir))
            return
        super().do_GET()

    def list_directory(self, path):
        # Only the files the page asks for are served; a directory listing shows nothing useful.
        self.send_error(404, "no directory listings")
        return None

    def translate_path(self, path: str) -> str:
        route = unquote(urlsplit(path).path)
        if route.startswith(EXAMPLES_PREFIX):
            name = posixpath.basename(route)
            # A flat folder: anything but a plain file name in it (.., sub/paths) is not an example.
            if name not in example_names(self.examples_dir):
                return str(self.examples_dir / "__missing__")
            return str(self.examples_dir / name)
        return super().translate_path(path)

    def end_headers(self) -> None:
        # The page is edited while it is served: never let the browser keep a stale script.
        self.send_header("Cache-Control", "no-cache")
        self.send_header("X-Content-Type-Options", "nosniff")
        super().end_headers()

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (http.server's signature)
        if not self.quiet:
            super().log_message(format, *args)

    def _send_json(self, document: object) -> None:
        body = json.dumps(document).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def make_server(host: str, port: int, *, quiet: bool = False,
                viewer_dir: Path = VIEWER_DIR, examples_dir: Path = EXAMPLES_DIR) -> ThreadingHTTPServer:
    """A bound, not yet serving server; port 0 picks a free one (see ``server.server_address``)."""
    handler = type("BoundViewerRequestHandler", (ViewerRequestHandler,), {"examples_dir": examples_dir, "quiet": quiet})
    server = ThreadingHTTPServer((host, port), partial(handler, directory=str(viewer_dir)))
    server.daemon_threads = True
    return server


def serve_in_thread(host: str = "127.0.0.1", port: int = 0, **options) -> tuple[ThreadingHTTPServer, threading.Thread]:
    """For tests: a server on its own thread; stop with ``server.shutdown(); server.server_close()``."""
    server = make_server(host, port, **options)
    thread = threading.Thread(target=server.serve_forever, name="viewer-http", daemon=True)
    thread.start()
    return server, thread


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.view", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="default: %(default)s (loopback only)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("VIEW_PORT") or DEFAULT_PORT),
                        help="default: $VIEW_PORT or %(default)s")
    parser.add_argument("--quiet", action="store_true", help="no access log")
    args = parser.parse_args(argv)
    try:
        server = make_server(args.host, args.port, quiet=args.quiet)
    except OSError as error:
        print(f"error: cannot listen on {args.host}:{args.port}: {error}", file=sys.stderr)
        return 1
    host, port = server.server_address[:2]
    print(f"Viewer on http://{host}:{port}/ (TorchServe at http://127.0.0.1:8080 and :8081 unless the page says "
          f"otherwise; ?inference=...&management=... set them).", flush=True)
    if port != DEFAULT_PORT:
        print(f"note: TorchServe's local config allows the origin http://127.0.0.1:{DEFAULT_PORT} only; set "
              f"cors_allowed_origin=http://{host}:{port} there for this port.", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

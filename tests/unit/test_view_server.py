"""tools.view: the viewer's static server serves the page and the demo examples, nothing else."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tools.http_client import http_request
from tools.view import VIEWER_DIR, example_names, main, serve_in_thread

PAGE_FILES = ("index.html", "viewer.css", "viewer.js", "favicon.svg")


@pytest.fixture(scope="module")
def origin():
    server, thread = serve_in_thread("127.0.0.1", 0, quiet=True)
    try:
        yield "http://%s:%d" % server.server_address[:2]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_page_and_examples_are_served(origin):
    page = http_request(origin + "/")
    assert page.status == 200 and "viewer.js" in page.text
    assert page.headers.get("Cache-Control") == "no-cache"
    names = http_request(origin + "/examples/index.json").json()
    assert names == example_names() and "circle.png" in names
    image = http_request(origin + "/examples/circle.png")
    assert image.status == 200 and image.body.startswith(b"\x89PNG")


@pytest.mark.parametrize("path", ["/examples/../../Makefile", "/examples/..%2F..%2FMakefile", "/../Makefile",
                                  "/examples/", "/examples/missing.png"])
def test_nothing_outside_the_page_and_examples(origin, path):
    reply = http_request(origin + path)
    assert reply.status == 404, (path, reply.status)


def test_the_page_loads_nothing_from_elsewhere():
    for name in PAGE_FILES:
        text = (VIEWER_DIR / name).read_text()
        # Every reference is relative to the page: no scheme-qualified or protocol-relative URL.
        referenced = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)""", text) + re.findall(r"url\(([^)]+)\)", text)
        assert all(not re.match(r"^(?:[a-z]+:)?//", ref.strip("'\"")) for ref in referenced), (name, referenced)
        assert "@import" not in text and "@font-face" not in text, name
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', (VIEWER_DIR / "index.html").read_text())
    assert csp and "script-src 'self'" in csp.group(1) and "style-src 'self'" in csp.group(1)


def test_a_busy_port_is_reported(capsys):
    server, thread = serve_in_thread("127.0.0.1", 0, quiet=True)
    try:
        assert main(["--port", str(server.server_address[1])]) == 1
        assert "cannot listen" in capsys.readouterr().err
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_examples_are_listed_from_the_folder(tmp_path: Path):
    (tmp_path / "b.png").write_bytes(b"")
    (tmp_path / "a.JPG").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("")
    assert example_names(tmp_path) == ["a.JPG", "b.png"]
    assert example_names(tmp_path / "missing") == []
    assert json.dumps(example_names(tmp_path))


def test_the_viewers_fallback_list_is_every_registered_explainer():
    """Offered when a server does not publish its allowed explainers: it must not miss a method."""
    import explainers

    script = (VIEWER_DIR / "viewer.js").read_text()
    listed = re.search(r"const KNOWN_EXPLAINERS = \[(.*?)\];", script, re.S).group(1)
    assert sorted(re.findall(r'"([a-z_]+)"', listed)) == explainers.available()

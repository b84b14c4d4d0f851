"""TorchServe's inference API on loopback, seen from the front server: one pooled aiohttp session
(keep-alive connections, created in the serving event loop), TorchServe's token when auth is on,
and a readiness check cached for a second (KServe asks readiness before every infer)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import aiohttp

from .errors import ClientError, UpstreamError
from .tensors import torchserve_error_text

READY_TTL_S = 1.0


class TorchServeUpstream:
    def __init__(self, inference_url: str, *, key_file: Path | str | None = None, timeout_s: float = 180.0,
                 connections: int = 64):
        """inference_url: e.g. ``http://127.0.0.1:8085``. key_file: TorchServe's ``key_file.json``
        when its token auth is on (re-read when it changes, e.g. after a key rotation)."""
        self.inference_url = inference_url.rstrip("/")
        self.key_file = Path(key_file) if key_file else None
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.connections = connections
        self._session: aiohttp.ClientSession | None = None
        self._key: tuple[float, str | None] | None = None  # (mtime, key)
        self._ready_at = 0.0
        self._ready = False

    def _session_now(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self.connections, keepalive_timeout=60, ttl_dns_cache=None)
            self._session = aiohttp.ClientSession(connector=connector, timeout=self.timeout,
                                                  json_serialize=lambda value: json.dumps(value))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _headers(self) -> dict[str, str]:
        key = self._inference_key()
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _inference_key(self) -> str | None:
        if self.key_file is None:
            return None
        try:
            mtime = self.key_file.stat().st_mtime
        except FileNotFoundError:
            return None
        if self._key is None or self._key[0] != mtime:
            try:
                key = json.loads(self.key_file.read_text())["inference"]["key"]
            except (OSError, ValueError, KeyError, TypeError):
                return None  # half written: next call
            self._key = (mtime, key)
        return self._key[1]

    async def post(self, path: str, body: bytes, content_type: str) -> dict:
        """POST to TorchServe; the JSON reply, or ClientError (its 4xx) / UpstreamError (5xx, down)."""
        headers = {"Content-Type": content_type, **self._headers()}
        try:
            async with self._session_now().post(self.inference_url + path, data=body, headers=headers) as response:
                payload = await response.read()
                status = response.status
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as error:
            self._ready = False
            raise UpstreamError(f"TorchServe unreachable at {self.inference_url}: {type(error).__name__}: {error}") from None
        if status == 200:
            self._ready, self._ready_at = True, time.monotonic()
            try:
                return json.loads(payload)
            except ValueError:
                raise UpstreamError(f"TorchServe answered 200 with a body that is not JSON: {payload[:200]!r}", 502) from None
        text = torchserve_error_text(status, payload)
        if 400 <= status < 500 and "InvalidKeyException" not in text:
            raise ClientError(text, status)
        raise UpstreamError(f"TorchServe answered {status}: {text}", status if status >= 500 else 503)

    async def ready(self) -> bool:
        """TorchServe's /ping says Healthy (every model has its workers); cached for READY_TTL_S."""
        now = time.monotonic()
        if now - self._ready_at < READY_TTL_S:
            return self._ready
        try:
            async with self._session_now().get(self.inference_url + "/ping", headers=self._headers(),
                                                timeout=aiohttp.ClientTimeout(total=2)) as response:
                body = await response.read()
                ready = response.status == 200 and json.loads(body).get("status") == "Healthy"
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError):
            ready = False
        self._ready, self._ready_at = ready, time.monotonic()
        return ready

"""TorchServe's inference API on loopback, seen from the front server: one pooled aiohttp session
(keep-alive connections, created in the serving event loop), TorchServe's token when auth is on,
and a readiness check cached for a second (KServe asks readiness before every infer).

Token auth: the inference key comes from TorchServe's ``key_file.json`` (re-read whenever the file
changes). TorchServe's keys expire (``token_expiration_min``, 60 by default); when TorchServe
refuses the key and the front server knows the management API, it asks for a new inference key
with the file's API key (``POST /token?type=inference``, which rewrites the file) and retries once.
"""

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
    def __init__(self, inference_url: str, *, key_file: Path | str | None = None, management_url: str | None = None,
                 timeout_s: float = 180.0, connections: int = 64):
        """inference_url: e.g. ``http://127.0.0.1:8085``. key_file: TorchServe's ``key_file.json``
        when its token auth is on. management_url: where to renew an expired inference key."""
        self.inference_url = inference_url.rstrip("/")
        self.management_url = management_url.rstrip("/") if management_url else None
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

    def _keys(self) -> dict:
        return json.loads(self.key_file.read_text())

    def _inference_key(self) -> str | None:
        if self.key_file is None:
            return None
        try:
            mtime = self.key_file.stat().st_mtime
        except FileNotFoundError:
            return None
        if self._key is None or self._key[0] != mtime:
            try:
                key = self._keys()["inference"]["key"]
            except (OSError, ValueError, KeyError, TypeError):
                return None  # half written: next call
            self._key = (mtime, key)
        return self._key[1]

    async def post(self, path: str, body: bytes, content_type: str, *, renewed: bool = False) -> dict:
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
        refused_key = status in (400, 401) and "InvalidKeyException" in text
        if refused_key and not renewed and await self._renew_inference_key():
            return await self.post(path, body, content_type, renewed=True)
        if 400 <= status < 500 and not refused_key:
            raise ClientError(text, status)
        raise UpstreamError(f"TorchServe answered {status}: {text}", status if status >= 500 else 503)

    async def allowed_explainers(self, model: str) -> list[str] | None:
        """The model's allowed explainers from TorchServe's description (the handler's custom
        metadata, ``GET <management>/models/{m}?customized=true``); None when unknown."""
        if self.management_url is None:
            return None
        headers = {}
        if self.key_file is not None:
            try:
                headers["Authorization"] = f"Bearer {self._keys()['management']['key']}"
            except (OSError, ValueError, KeyError, TypeError):
                return None
        try:
            async with self._session_now().get(f"{self.management_url}/models/{model}?customized=true", headers=headers,
                                                timeout=aiohttp.ClientTimeout(total=10)) as response:
                if response.status != 200:
                    return None
                described = json.loads(await response.read())
            metadata = described[0].get("customizedMetadata") or {}
            if isinstance(metadata, str):  # the handler's JSON text, as some TorchServe versions pass it on
                metadata = json.loads(metadata)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError, KeyError, IndexError, TypeError):
            return None
        allowed = metadata.get("allowed_explainers") if isinstance(metadata, dict) else None
        return [str(name) for name in allowed] if isinstance(allowed, list) else None

    async def _renew_inference_key(self) -> bool:
        """A new inference key from TorchServe's token API (it rewrites key_file.json)."""
        if self.key_file is None or self.management_url is None:
            return False
        try:
            api_key = self._keys()["API"]["key"]
            async with self._session_now().post(f"{self.management_url}/token?type=inference",
                                                headers={"Authorization": f"Bearer {api_key}"}) as response:
                await response.read()
                renewed = response.status == 200
        except (OSError, ValueError, KeyError, TypeError, aiohttp.ClientError, asyncio.TimeoutError):
            return False
        self._key = None  # re-read, even if the file's mtime did not move
        return renewed

    async def ready(self) -> bool:
        """TorchServe's /ping says Healthy (every model has its workers); cached for READY_TTL_S."""
        now = time.monotonic()
        if now - self._ready_at < READY_TTL_S:
            return self._ready
        ready = await self._ping()
        if ready is None and await self._renew_inference_key():  # the key expired
            ready = await self._ping()
        self._ready, self._ready_at = bool(ready), time.monotonic()
        return self._ready

    async def _ping(self) -> bool | None:
        """Healthy or not; None when TorchServe refused the key."""
        try:
            async with self._session_now().get(self.inference_url + "/ping", headers=self._headers(),
                                                timeout=aiohttp.ClientTimeout(total=2)) as response:
                body = await response.read()
                if response.status in (400, 401) and b"InvalidKeyException" in body:
                    return None
                return response.status == 200 and json.loads(body).get("status") == "Healthy"
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError):
            return False

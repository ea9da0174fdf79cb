"""A synchronous httpx client that talks to an ASGI app in process, without a socket.

``httpx.ASGITransport`` is async only; this wraps it for ``httpx.Client`` by running each request on
an anyio event loop in a helper thread (a blocking portal). Chosen over Starlette's ``TestClient``,
which reads a whole streamed body before the app sees any of it: here the app receives a streamed
request body one ``http.request`` message per chunk, pulled only when it asks for more, as over a
connection, so a limit enforced while reading shows when reading stopped. A request that gets no
response within the client's read timeout fails with ``httpx.ReadTimeout``, as over the network. The
app's own exceptions propagate (``raise_app_exceptions``) instead of becoming a bare 500.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import httpx
from anyio.from_thread import BlockingPortal, start_blocking_portal

BASE_URL = "http://test"


class _AsyncBody(httpx.AsyncByteStream):
    """A sync request body (e.g. a generator) handed to the app chunk by chunk, as it asks."""

    def __init__(self, stream: httpx.SyncByteStream) -> None:
        self._stream = stream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self._stream:
            yield chunk


class SyncASGITransport(httpx.BaseTransport):
    """``httpx.ASGITransport`` for a sync ``httpx.Client``, its requests run through ``portal``."""

    def __init__(self, app: Any, portal: BlockingPortal) -> None:
        self._asgi = httpx.ASGITransport(app=app)
        self._portal = portal

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        stream = request.stream
        if not isinstance(stream, httpx.AsyncByteStream):
            assert isinstance(stream, httpx.SyncByteStream)
            stream = _AsyncBody(stream)
        # The same method, URL and headers (Content-Length or Transfer-Encoding as httpx set them).
        forwarded = httpx.Request(
            request.method, request.url, headers=request.headers, stream=stream, extensions=request.extensions
        )
        timeout = request.extensions.get("timeout", {}).get("read")
        return self._portal.call(self._send, forwarded, timeout)

    async def _send(self, request: httpx.Request, timeout: float | None) -> httpx.Response:
        try:
            with anyio.fail_after(timeout):
                response = await self._asgi.handle_async_request(request)
                body = b"".join([chunk async for chunk in response.aiter_raw()])
        except TimeoutError:
            raise httpx.ReadTimeout(f"no response within {timeout} s", request=request) from None
        # The raw bytes and headers as the app sent them: no Content-Length is added here.
        return httpx.Response(response.status_code, headers=response.headers, stream=httpx.ByteStream(body))


@contextmanager
def asgi_client(app: Any, timeout: float = 30) -> Iterator[httpx.Client]:
    """An ``httpx.Client`` whose requests go to ``app`` in this process."""
    with start_blocking_portal(backend="asyncio") as portal:
        transport = SyncASGITransport(app, portal)
        with httpx.Client(transport=transport, base_url=BASE_URL, timeout=timeout) as client:
            yield client

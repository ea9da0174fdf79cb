"""How ``bioconf serve`` runs the app: uvicorn's settings in one place, so that the load benchmark
(``benchmarks/service_load.py``) serves the app exactly as the command does. Apart from
``bioconf.service``, which worker processes import too: they have no use for uvicorn."""

from __future__ import annotations

import uvicorn
from starlette.types import ASGIApp


def serve(app: ASGIApp, host: str, port: int, *, access_log: bool = False) -> None:
    """Serve ``app`` until interrupted. httptools parses HTTP (the service extra installs it; uvicorn's
    other parser, h11, is pure Python); asyncio's event loop, not uvloop: as fast here, and fair under
    many connections (uvloop's p99 at 64 connections was 8x asyncio's). No access log unless asked."""
    uvicorn.run(
        app,
        host=host,
        port=port,
        http="httptools",
        loop="asyncio",
        access_log=access_log,
        server_header=False,
    )

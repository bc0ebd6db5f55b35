"""A loopback WebSocket endpoint speaking SurrealDB's CBOR RPC, in front of the real engine.

No SurrealDB server binary can be installed here (no package registry carries one), so the
tests of `INBOX_DATABASE_URL=ws://…` talk to this: the SDK's own WebSocket client (the code a
user's server or cluster would see) on one side, the real SurrealDB engine (the SDK's embedded
build, on disk) on the other. Each binary frame is one RPC request, handed to the engine as is;
the engine's reply (which echoes the request id) goes back as one frame. Calls are serialised,
as the embedded engine needs (ENGINE-NOTES), so several clients can share it. A request the
engine refuses by raising (a failed `signin`, for one) is answered as a server answers it: an
RPC error with the request's id, the connection kept.
"""

from __future__ import annotations

import asyncio
from typing import Any

import cbor2
import websockets
from surrealdb._surrealdb_ext import AsyncEmbeddedDB


class EngineOverWebSocket:
    def __init__(self, url: str) -> None:
        self.engine_url = url  # e.g. surrealkv:///tmp/x/db
        self.requests = 0
        self._db: Any = None
        self._server: Any = None
        self._lock = asyncio.Lock()

    async def start(self) -> str:
        """Open the engine and listen on 127.0.0.1; returns the ws:// URL to give clients."""
        self._db = AsyncEmbeddedDB(self.engine_url)
        await self._db.connect()
        self._server = await websockets.serve(self._serve, "127.0.0.1", 0, max_size=None,
                                              subprotocols=[websockets.Subprotocol("cbor")])
        port = next(iter(self._server.sockets)).getsockname()[1]
        return f"ws://127.0.0.1:{port}"

    async def _serve(self, ws: Any) -> None:
        async for frame in ws:
            if isinstance(frame, str):
                await ws.close(1003, "binary CBOR frames only")
                return
            async with self._lock:
                self.requests += 1
                try:
                    reply = await self._db.execute(frame)
                except RuntimeError as exc:
                    # Left to propagate, this also made the engine abort the process later
                    # ("panic in a function that cannot unwind").
                    request = cbor2.loads(frame)
                    reply = cbor2.dumps({"id": request.get("id"),
                                         "error": {"code": -32000, "message": str(exc)}})
            await ws.send(reply)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        if self._db is not None:
            await self._db.close()

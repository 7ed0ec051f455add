"""A bare aiocoap server for ``bench/coap.py``: PUT on /mqtt/bench/c answers 2.04 Changed.

The same request shape as the mqgate gateway's publish (the query is ignored), on aiocoap's defaults: its own
transports and duplicate detection, the default asyncio event loop.

    python bench/_aiocoap_server.py HOST PORT
"""

from __future__ import annotations

import asyncio
import sys

import aiocoap  # type: ignore[import-untyped]
import aiocoap.resource  # type: ignore[import-untyped]


class Changed(aiocoap.resource.Resource):  # type: ignore[misc]
    async def render_put(self, request: aiocoap.Message) -> aiocoap.Message:
        return aiocoap.Message(code=aiocoap.CHANGED)


async def serve(host: str, port: int) -> None:
    site = aiocoap.resource.Site()
    site.add_resource(["mqtt", "bench", "c"], Changed())
    await aiocoap.Context.create_server_context(site, bind=(host, port))
    await asyncio.Event().wait()  # until SIGTERM


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1], int(sys.argv[2])))

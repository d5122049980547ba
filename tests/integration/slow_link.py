"""A slow network link for tests: a TCP relay in front of the server's site address that carries at most
`rate` bytes per second each way, all connections sharing it (as a hospital's uplink is shared). TLS passes
through it untouched, so the sites still verify the server end to end."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator

CHUNK = 16 << 10


class Bucket:
    """One direction's capacity: whoever sends waits until the link has carried what went before."""

    def __init__(self, rate: float) -> None:
        self.rate, self.free_at = rate, time.monotonic()
        self.carried = 0

    async def carry(self, n: int) -> None:
        now = time.monotonic()
        self.free_at = max(self.free_at, now) + n / self.rate
        self.carried += n
        await asyncio.sleep(self.free_at - now)


@contextlib.contextmanager
def slow_link(target: int, rate: float) -> Iterator[tuple[int, dict[str, Bucket]]]:
    """A relay on a free loopback port to 127.0.0.1:`target` at `rate` bytes/s each way; yields (its port,
    the buckets "up" (site -> server) and "down", which count the bytes carried)."""
    buckets = {"up": Bucket(rate), "down": Bucket(rate)}
    loop = asyncio.new_event_loop()
    ready: list[int] = []

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, bucket: Bucket) -> None:
        with contextlib.suppress(ConnectionError, OSError):  # a peer that hung up ends its direction
            while data := await reader.read(CHUNK):
                await bucket.carry(len(data))
                writer.write(data)
                await writer.drain()
        writer.close()

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target)
        except OSError:
            writer.close()
            return
        try:
            await asyncio.gather(
                pipe(reader, up_writer, buckets["up"]), pipe(up_reader, writer, buckets["down"])
            )
        except asyncio.CancelledError:  # the link is taken down: close both ends, end quietly
            writer.close()
            up_writer.close()

    async def serve() -> None:
        server = await asyncio.start_server(relay, "127.0.0.1", 0)
        ready.append(server.sockets[0].getsockname()[1])
        async with server:
            await server.serve_forever()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    serving = asyncio.run_coroutine_threadsafe(serve(), loop)
    while not ready:
        time.sleep(0.01)
    try:
        yield ready[0], buckets
    finally:
        asyncio.run_coroutine_threadsafe(_cancel_all(), loop).result(10)
        serving.cancel()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


async def _cancel_all() -> None:
    """Every relay task of the loop but this one cancelled, and waited for (their sockets closed)."""
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)

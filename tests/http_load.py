"""A minimal HTTP/1.1 load generator for loopback tests: ``concurrency`` keep-alive
connections, each sending its share of the requests back to back. (httpx's pool slows down
quadratically with thousands of queued requests; this does not.)"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    port: int
    seconds: float


async def _read_reply(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            body += chunk[:-2]
        return status, headers, body
    length = int(headers.get("content-length", "0"))
    return status, headers, await reader.readexactly(length)


async def fire(
    targets: list[tuple[int, str, dict[str, str]]], concurrency: int = 100, timeout: float = 30
) -> list[Reply]:
    """Send every (port, path, headers) to 127.0.0.1; replies come back in the same order."""
    replies: list[Reply | None] = [None] * len(targets)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(targets)):
        queue.put_nowait(i)
    loop = asyncio.get_running_loop()

    async def worker() -> None:
        conns: dict[int, tuple[asyncio.StreamReader, asyncio.StreamWriter]] = {}
        try:
            while not queue.empty():
                i = queue.get_nowait()
                port, path, headers = targets[i]
                if port not in conns:
                    conns[port] = await asyncio.open_connection("127.0.0.1", port)
                reader, writer = conns[port]
                extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
                started = loop.time()
                writer.write(f"GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\n{extra}\r\n".encode())
                status, head, body = await asyncio.wait_for(_read_reply(reader), timeout)
                replies[i] = Reply(status, head, body, port, loop.time() - started)
                if head.get("connection") == "close":
                    writer.close()
                    del conns[port]
        finally:
            for _, writer in conns.values():
                writer.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    assert all(r is not None for r in replies)
    return [r for r in replies if r is not None]

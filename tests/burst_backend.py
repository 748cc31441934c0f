"""A vLLM-shaped backend whose stream arrives in two bursts: the first token event alone, then every
other event (tokens, the usage chunk, ``[DONE]``) in one write, as when an engine outruns the proxy.

Run: ``python tests/burst_backend.py PORT TOKENS``. Any GET answers 200 ``{}`` (health, metrics).
"""

from __future__ import annotations

import asyncio
import json
import sys


def event(body: dict) -> bytes:
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def token(text: str) -> bytes:
    return event({"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": text}}]})


def chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tokens: int) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await reader.readexactly(length)
            if not head.startswith(b"POST"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
                continue
            usage = {"prompt_tokens": 3, "completion_tokens": tokens, "total_tokens": 3 + tokens}
            rest = b"".join(token(f"t{i}") for i in range(1, tokens))
            rest += event({"id": "c", "object": "chat.completion.chunk", "choices": [], "usage": usage})
            rest += b"data: [DONE]\n\n"
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
            writer.write(chunked(token("t0")))
            await writer.drain()
            await asyncio.sleep(0.05)  # the proxy reads the first event alone
            writer.write(chunked(rest) + b"0\r\n\r\n")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


async def main(port: int, tokens: int) -> None:
    server = await asyncio.start_server(lambda r, w: handle(r, w, tokens), "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))

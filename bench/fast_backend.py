"""A deliberately fast fake OpenAI backend for proxy-overhead benchmarks (raw asyncio protocol).

Non-streamed requests get a fixed chat completion; streamed ones get a role chunk, N content
chunks (``--interval-ms`` apart), a usage chunk when asked, and ``[DONE]``. ``/health`` and
``/metrics`` answer 200. Run: ``python bench/fast_backend.py --port P [--chunks N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json

REPLY = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 0,
        "model": "bench",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
    }
).encode()


def chunk(delta: dict, finish: str | None = None) -> bytes:
    body = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "bench",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(body).encode() + b"\n\n"


USAGE = (
    b"data: "
    + json.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": "bench",
            "choices": [],
            "usage": {"prompt_tokens": 5, "completion_tokens": 8, "total_tokens": 13},
        }
    ).encode()
)


def http_chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


class Backend(asyncio.Protocol):
    chunks = 16
    interval = 0.0

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            head_end = self.buffer.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = self.buffer[:head_end].decode("latin-1")
            length = 0
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            if len(self.buffer) < head_end + 4 + length:
                return
            body = self.buffer[head_end + 4 : head_end + 4 + length]
            self.buffer = self.buffer[head_end + 4 + length :]
            self.respond(head.split(" ", 2)[1], body)

    def respond(self, path: str, body: bytes) -> None:
        if path.startswith(("/health", "/metrics")):
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nContent-Type: text/plain\r\n\r\n")
        elif b'"stream":true' in body.replace(b" ", b""):
            asyncio.get_running_loop().create_task(self.stream(b'"include_usage":true' in body.replace(b" ", b"")))
        else:
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                + str(len(REPLY)).encode()
                + b"\r\n\r\n"
                + REPLY
            )

    async def stream(self, usage: bool) -> None:
        write = self.transport.write
        write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        write(http_chunk(chunk({"role": "assistant", "content": ""})))
        for index in range(self.chunks):
            if self.interval:
                await asyncio.sleep(self.interval)
            if self.transport.is_closing():
                return  # the client left
            last = index == self.chunks - 1
            write(http_chunk(chunk({"content": " tok"}, "stop" if last else None)))
        if usage:
            write(http_chunk(USAGE + b"\n\n"))
        write(http_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")


async def serve(host: str, port: int) -> None:
    server = await asyncio.get_running_loop().create_server(Backend, host, port, backlog=4096)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--interval-ms", type=float, default=0.0)
    args = parser.parse_args()
    Backend.chunks = args.chunks
    Backend.interval = args.interval_ms / 1e3
    import uvloop

    uvloop.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()

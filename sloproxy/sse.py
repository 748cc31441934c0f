"""Incremental server-sent-events splitting for upstream streams.

Engines differ in framing (``data: {…}`` vs TGI's ``data:{…}``, ``\\n`` vs ``\\r\\n``); this
yields each event's data payload as it completes, whatever bytes boundaries the network used.
"""

from __future__ import annotations


class SSEDecoder:
    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        """Payloads of the events completed by ``chunk`` (``data`` lines joined by newlines)."""
        buffer = self._buffer + chunk
        held = b""
        if buffer.endswith(b"\r"):  # it may be half of a \r\n split across reads
            buffer, held = buffer[:-1], b"\r"
        if b"\r" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        events = buffer.split(b"\n\n")
        self._buffer = events.pop() + held
        payloads: list[bytes] = []
        for event in events:
            data: list[bytes] = []
            for line in event.split(b"\n"):
                if line.startswith(b"data:"):
                    value = line[5:]
                    data.append(value[1:] if value.startswith(b" ") else value)
            if data:
                payloads.append(b"\n".join(data) if len(data) > 1 else data[0])
        return payloads

    @property
    def pending(self) -> bytes:
        """Bytes of an event not terminated yet (a stream that ends here ended abruptly)."""
        return self._buffer

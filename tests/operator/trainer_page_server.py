"""A real HTTP server on 127.0.0.1 that plays a trainer pod's /metrics, well or badly.

Each answer is written by hand on the socket, so the server can do what a hostile or broken pod does:
redirect, answer with a malformed status line, trickle its bytes, or send far more than any metrics page.
"""

from __future__ import annotations

import contextlib
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

MIB = 1024 * 1024
Answer = Callable[["TrainerPageServer", socket.socket], None]


@dataclass
class Record:
    paths: list[str] = field(default_factory=list)
    """The path of every request received, in order."""
    bytes_sent: int = 0
    """Body bytes the server managed to hand to the kernel before the client went away."""


class TrainerPageServer:
    def __init__(self) -> None:
        self.answer: Answer = page(b"kubetune_trainer_step 1\n")
        self.record = Record()
        self.stopping = threading.Event()
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                head = b""
                while b"\r\n\r\n" not in head:
                    data = self.request.recv(4096)
                    if not data:
                        return
                    head += data
                request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
                outer.record.paths.append(request_line.split(" ")[1] if " " in request_line else "")
                # The client hanging up mid-answer is what most answers here wait for.
                with contextlib.suppress(OSError):
                    outer.answer(outer, self.request)

        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> TrainerPageServer:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stopping.set()
        self._server.shutdown()
        self._server.server_close()

    def send_body(self, conn: socket.socket, data: bytes) -> None:
        conn.sendall(data)
        self.record.bytes_sent += len(data)


def page(body: bytes, status: str = "200 OK", extra_headers: str = "") -> Answer:
    def answer(_server: TrainerPageServer, conn: socket.socket) -> None:
        conn.sendall(
            f"HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
            f"{extra_headers}Connection: close\r\n\r\n".encode()
            + body
        )

    return answer


def redirect(location: str) -> Answer:
    return page(b"moved", status="302 Found", extra_headers=f"Location: {location}\r\n")


def raw(data: bytes) -> Answer:
    def answer(_server: TrainerPageServer, conn: socket.socket) -> None:
        conn.sendall(data)

    return answer


def trickle(head: bytes, body: bytes, every_seconds: float) -> Answer:
    """Send ``head`` at once, then ``body`` one byte per ``every_seconds``."""

    def answer(server: TrainerPageServer, conn: socket.socket) -> None:
        conn.sendall(head)
        for index in range(len(body)):
            if server.stopping.wait(every_seconds):
                return
            server.send_body(conn, body[index : index + 1])

    return answer


def endless(total_bytes: int, *, declare_length: bool, chunked: bool = False) -> Answer:
    """A 200 whose body is ``total_bytes`` of valid-looking metric comments, sent as fast as the client
    reads; with ``declare_length`` the size is announced in Content-Length."""
    line = b"# " + b"x" * 1021 + b"\n"
    block = line * 64  # 64 KiB

    def answer(server: TrainerPageServer, conn: socket.socket) -> None:
        if chunked:
            framing = "Transfer-Encoding: chunked\r\n"
        elif declare_length:
            framing = f"Content-Length: {total_bytes}\r\n"
        else:
            framing = ""
        conn.sendall(
            f"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n{framing}Connection: close\r\n\r\n".encode()
        )
        sent = 0
        while sent < total_bytes and not server.stopping.is_set():
            data = block[: total_bytes - sent]
            server.send_body(conn, b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
            sent += len(data)
        if chunked:
            conn.sendall(b"0\r\n\r\n")

    return answer


def timed(call: Callable[[], object]) -> tuple[object, float]:
    started = time.monotonic()
    result = call()
    return result, time.monotonic() - started

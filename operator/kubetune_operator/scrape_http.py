"""One bounded read of a trainer pod's /metrics page.

The page comes from a pod that runs a tenant's image, so the answer is untrusted: it may redirect, never end,
trickle a byte at a time or be as large as it likes. This reader follows no redirect, stops reading past
``max_bytes``, and holds every step (connect, send, each receive) to one deadline for the whole exchange, so a
pod cannot keep a scrape slot longer than that. Its errors say what went wrong and never carry the bytes the
pod sent, because they end up in the operator's log.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import time
from typing import Any

MAX_BODY_BYTES = 1024 * 1024
"""A trainer's page is a few kilobytes; anything past 1 MiB is not a trainer's page."""
READ_CHUNK_BYTES = 64 * 1024
METRICS_PATH = "/metrics"


class ScrapeError(OSError):
    """A trainer's /metrics could not be read within the limits. ``kind`` names the failure for metrics
    and tests: connect, deadline, redirect, status, too_large, protocol, address."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind

    def __str__(self) -> str:
        return str(self.args[0])


class _DeadlineSocket(socket.socket):
    """A socket whose every receive and send waits only for what is left of one deadline."""

    deadline: float = 0.0

    def _remaining(self) -> float:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("scrape deadline reached")
        return remaining

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        self.settimeout(self._remaining())
        return super().recv_into(buffer, nbytes, flags)

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        self.settimeout(self._remaining())
        return super().recv(bufsize, flags)

    def sendall(self, data: Any, flags: int = 0) -> None:
        self.settimeout(self._remaining())
        super().sendall(data, flags)


class _PodConnection(http.client.HTTPConnection):
    """HTTP/1.1 to one IP address over a _DeadlineSocket. http.client never follows redirects itself."""

    def __init__(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int, deadline: float) -> None:
        super().__init__(str(ip), port)
        self._ip = ip
        self._deadline = deadline

    def connect(self) -> None:
        family = socket.AF_INET6 if self._ip.version == 6 else socket.AF_INET
        sock = _DeadlineSocket(family, socket.SOCK_STREAM)
        sock.deadline = self._deadline
        try:
            sock.settimeout(sock._remaining())
            sock.connect((str(self._ip), self.port))
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def pod_address(pod_ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The pod IP as an address; a host name or an address no pod can have is refused."""
    try:
        ip = ipaddress.ip_address(pod_ip)
    except ValueError:
        raise ScrapeError(
            "address", f"pod IP {pod_ip[:64]!r} is not an IP address; nothing was scraped"
        ) from None
    if ip.is_unspecified or ip.is_multicast:
        raise ScrapeError("address", f"pod IP {ip} cannot be a pod's address; nothing was scraped")
    return ip


def fetch_metrics(pod_ip: str, port: int, *, deadline_seconds: float, max_bytes: int = MAX_BODY_BYTES) -> str:
    """GET http://<pod_ip>:<port>/metrics and return the page as text, or raise ScrapeError."""
    ip = pod_address(pod_ip)
    where = f"http://{f'[{ip}]' if ip.version == 6 else ip}:{port}{METRICS_PATH}"
    deadline = time.monotonic() + deadline_seconds
    conn = _PodConnection(ip, port, deadline)
    try:
        conn.request("GET", METRICS_PATH, headers={"Accept": "text/plain", "Connection": "close"})
        response = conn.getresponse()
        if 300 <= response.status < 400:
            raise ScrapeError(
                "redirect",
                f"{where} answered HTTP {response.status} (a redirect); redirects are not followed: "
                "the trainer must serve its metrics at this address",
            )
        if response.status != 200:
            raise ScrapeError("status", f"{where} answered HTTP {response.status}, not 200")
        declared = response.getheader("Content-Length")
        if declared is not None and declared.strip().isdigit() and int(declared) > max_bytes:
            raise ScrapeError("too_large", _too_large(where, max_bytes))
        body = bytearray()
        while chunk := response.read1(READ_CHUNK_BYTES):
            body += chunk
            if len(body) > max_bytes:
                raise ScrapeError("too_large", _too_large(where, max_bytes))
    except ScrapeError:
        raise
    except TimeoutError:
        raise ScrapeError(
            "deadline",
            f"{where} did not answer in full within {deadline_seconds:g}s; the read was abandoned",
        ) from None
    except http.client.HTTPException as exc:
        # Their text can hold the bytes the pod sent (a status line, a header): name the failure only.
        raise ScrapeError(
            "protocol", f"{where} did not answer with valid HTTP ({type(exc).__name__})"
        ) from None
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ScrapeError("connect", f"{where} could not be read: {reason}") from None
    finally:
        conn.close()
    return body.decode("utf-8", errors="replace")


def _too_large(where: str, max_bytes: int) -> str:
    return f"{where} sent more than {max_bytes} bytes; the read was abandoned (a trainer's page is smaller)"

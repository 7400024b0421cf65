"""Reading a trainer pod's /metrics with limits, against a real HTTP server on 127.0.0.1 that misbehaves.

The reader under test is the operator's own (``KubeIO.scrape``); the pod's answer is untrusted input."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from kubernetes import client as k8s_client
from trainer_page_server import MIB, TrainerPageServer, endless, page, raw, redirect, timed, trickle

from kubetune_operator.config import OperatorConfig
from kubetune_operator.k8s_io import KubeIO

DEADLINE_SECONDS = 1.0
SLACK_SECONDS = 0.75
"""What the scheduler of a busy CI machine may add to the deadline before the reader notices it."""


@pytest.fixture
def server() -> Iterator[TrainerPageServer]:
    with TrainerPageServer() as running:
        yield running


@pytest.fixture
def io() -> KubeIO:
    return KubeIO(k8s_client.ApiClient(), OperatorConfig(scrape_timeout_seconds=DEADLINE_SECONDS))


def refused(io: KubeIO, server: TrainerPageServer) -> OSError:
    with pytest.raises(OSError) as caught:
        io.scrape("127.0.0.1", server.port)
    return caught.value


def test_a_redirect_is_not_followed(io: KubeIO, server: TrainerPageServer) -> None:
    server.answer = redirect(f"http://127.0.0.1:{server.port}/elsewhere")
    error = refused(io, server)
    assert getattr(error, "kind", None) == "redirect"
    assert "redirect" in str(error) and "302" in str(error)
    assert server.record.paths == ["/metrics"]  # the Location was never asked for
    server.answer = page(b"kubetune_trainer_step 7\n")
    assert io.scrape("127.0.0.1", server.port) == "kubetune_trainer_step 7\n"


def test_a_trickling_pod_holds_the_reader_no_longer_than_the_deadline(
    io: KubeIO, server: TrainerPageServer
) -> None:
    cases = {
        "body": trickle(
            b"HTTP/1.1 200 OK\r\nContent-Length: 240\r\nConnection: close\r\n\r\n",
            b"kubetune_trainer_step 1\n" * 10,
            every_seconds=0.05,
        ),
        "status line and headers": trickle(b"", b"HTTP/1.1 200 OK\r\nX-Padding: " + b"a" * 240, 0.05),
    }
    for what, answer in cases.items():
        server.answer = answer
        outcome, elapsed = timed(lambda: _scrape_or_error(io, server))
        assert isinstance(outcome, OSError), f"a trickled {what} was read in full: {outcome!r}"
        assert getattr(outcome, "kind", None) == "deadline", what
        assert DEADLINE_SECONDS * 0.9 <= elapsed <= DEADLINE_SECONDS + SLACK_SECONDS, (what, elapsed)
        assert f"{DEADLINE_SECONDS:g}s" in str(outcome)


@pytest.mark.parametrize(
    "framing",
    [
        pytest.param({"declare_length": True}, id="Content-Length"),
        pytest.param({"declare_length": False}, id="until-close"),
        pytest.param({"declare_length": False, "chunked": True}, id="chunked"),
    ],
)
def test_a_100_mib_answer_is_abandoned_past_1_mib(
    io: KubeIO, server: TrainerPageServer, framing: dict[str, bool]
) -> None:
    server.answer = endless(100 * MIB, **framing)
    error = refused(io, server)
    assert getattr(error, "kind", None) == "too_large"
    assert "1048576 bytes" in str(error)
    # The reader stopped early: what the kernel buffers between the two ends is a few MiB at most.
    assert server.record.bytes_sent < 32 * MIB


def test_an_answer_that_is_not_http_is_an_os_error_naming_no_bytes(
    io: KubeIO, server: TrainerPageServer
) -> None:
    server.answer = raw(b"SSH-2.0-OpenSSH_9.6 secret-banner\r\n\r\n")
    error = refused(io, server)
    assert getattr(error, "kind", None) == "protocol"
    assert "secret-banner" not in str(error)


def _scrape_or_error(io: KubeIO, server: TrainerPageServer) -> str | OSError:
    try:
        return io.scrape("127.0.0.1", server.port)
    except OSError as exc:
        return exc

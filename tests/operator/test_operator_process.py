"""The operator as a process: `python -m kubetune_operator` with its real health and metrics servers."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(str(ROOT / p) for p in ("operator", "trainer_image", "."))
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_help_lists_the_contract_flags() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kubetune_operator", "--help"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    for flag in (
        "--namespace",
        "--all-namespaces",
        "--leader-election",
        "--standalone",
        "--health-port",
        "--metrics-port",
        "KUBETUNE_SCRAPE_INTERVAL_SECONDS",
    ):
        assert flag in result.stdout


def test_bad_setting_exits_with_a_clear_error() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kubetune_operator", "--standalone"],
        env=_env(KUBETUNE_SCRAPE_INTERVAL_SECONDS="often"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "KUBETUNE_SCRAPE_INTERVAL_SECONDS='often' is not a number of seconds" in result.stderr


def _get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=2) as response:
        return response.status, response.read().decode()


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_health_and_metrics_servers_answer(tmp_path: Path) -> None:
    # An API server that refuses connections: the operator keeps retrying while its servers answer.
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "none",
                "clusters": [{"name": "none", "cluster": {"server": f"http://127.0.0.1:{_free_port()}"}}],
                "contexts": [{"name": "none", "context": {"cluster": "none", "user": "none"}}],
                "users": [{"name": "none", "user": {"token": "unused"}}],
            }
        )
    )
    health, metrics = _free_port(), _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kubetune_operator",
            "--standalone",
            "--health-port",
            str(health),
            "--metrics-port",
            str(metrics),
        ],
        env=_env(KUBECONFIG=str(kubeconfig), POD_IP="127.0.0.1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        answers: dict[str, tuple[int, str]] = {}
        while time.monotonic() < deadline and len(answers) < 2 and proc.poll() is None:
            for name, url in (
                ("health", f"http://127.0.0.1:{health}/healthz"),
                ("metrics", f"http://127.0.0.1:{metrics}/metrics"),
            ):
                if name not in answers:
                    with contextlib.suppress(urllib.error.URLError, ConnectionError):
                        answers[name] = _get(url)
            time.sleep(0.2)
        assert set(answers) == {"health", "metrics"}, f"exit code {proc.poll()}"
        assert answers["health"][0] == 200 and json.loads(answers["health"][1]) == {}
        assert answers["metrics"][0] == 200
        for series in (
            'kubetune_operator_finetunejobs{phase="Running"} 0.0',
            "kubetune_operator_time_to_trainer_start_seconds_bucket",
            "# TYPE kubetune_operator_job_duration_seconds histogram",
            "# TYPE kubetune_operator_reconcile_errors_total counter",
        ):
            assert series in answers["metrics"][1]
    finally:
        proc.terminate()
        output, _ = proc.communicate(timeout=30)
    lines = [line for line in output.splitlines() if line.startswith("{")]
    assert lines, output
    assert any(
        json.loads(line).get("message", "").startswith("kubetune operator configured") for line in lines
    )


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the arena cap is a glibc setting")
def test_malloc_arenas_are_capped_unless_the_environment_says_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from kubetune_operator.__main__ import limit_malloc_arenas

    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    assert limit_malloc_arenas() is True
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert limit_malloc_arenas() is False

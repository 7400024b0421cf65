"""Processes the launcher starts: where their binaries are, free ports, a pids file, and a stop that touches
only recorded PIDs."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

BUILD_SCRIPT = Path(__file__).resolve().parent / "build.sh"


def bin_dir() -> Path:
    """Where ``build.sh`` puts the Go binaries it builds (``build.sh --print``)."""
    out = subprocess.run(
        ["bash", str(BUILD_SCRIPT), "--print"], check=True, capture_output=True, text=True
    ).stdout.strip()
    return Path(out)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def port_is_listening(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


@dataclass(frozen=True)
class ProcessRecord:
    name: str
    pid: int
    exe: str  # argv[0] as started, compared with /proc/<pid>/cmdline before any signal
    log: str


def _cmdline_exe(pid: int) -> str | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return raw.split(b"\0", 1)[0].decode(errors="replace") if raw else None


def pid_running(pid: int) -> bool:
    """True while process ``pid`` exists and has not exited (a zombie has exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The command name (field 2) may hold spaces and parentheses; the state follows its last ")".
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def is_alive(record: ProcessRecord) -> bool:
    """True while the recorded PID still runs the recorded program (a recycled PID does not count)."""
    exe = _cmdline_exe(record.pid)
    return exe is not None and exe == record.exe and pid_running(record.pid)


class PidFile:
    """JSON list of the processes one cluster owns; written after every start so a crash loses nothing."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> list[ProcessRecord]:
        if not self.path.exists():
            return []
        return [ProcessRecord(**r) for r in json.loads(self.path.read_text())]

    def add(self, record: ProcessRecord) -> None:
        records = [r for r in self.read() if r.name != record.name]
        records.append(record)
        self._write(records)

    def _write(self, records: list[ProcessRecord]) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps([asdict(r) for r in records], indent=1))
        tmp.replace(self.path)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def start(
    name: str,
    argv: Sequence[str],
    log: Path,
    pidfile: PidFile,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    exe: str | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in its own session (so a terminal's Ctrl-C does not reach it) with output to ``log``.

    ``exe``: the program the PID runs once started, when ``argv`` is a wrapper that execs it (``unshare ...
    sh -c 'exec prog'``); recorded so ``is_alive`` recognises the PID. Default ``argv[0]``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
        )
    pidfile.add(ProcessRecord(name=name, pid=proc.pid, exe=exe or argv[0], log=str(log)))
    return proc


def stop(records: Sequence[ProcessRecord], grace: float = 10.0) -> list[str]:
    """SIGTERM each live recorded process, wait up to ``grace`` seconds, then SIGKILL what is left.

    Returns the names that needed SIGKILL. Exited processes are reaped here when they are our children
    (pytest's session), by init otherwise (after ``python -m e2e.cluster up`` has exited).
    """
    live = [r for r in records if is_alive(r)]
    for r in live:
        _signal(r.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(is_alive(r) for r in live):
        _reap(live)
        time.sleep(0.05)
    killed = []
    for r in live:
        if is_alive(r):
            _signal(r.pid, signal.SIGKILL)
            killed.append(r.name)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(is_alive(r) for r in live):
        _reap(live)
        time.sleep(0.05)
    _reap(live)
    return killed


def terminate(proc: subprocess.Popen[bytes], grace: float = 15.0) -> None:
    """Stop a child of ours: SIGTERM, then SIGKILL if it has not exited within ``grace`` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _reap(records: Sequence[ProcessRecord]) -> None:
    """Collect those recorded processes that are our own exited children, so none lingers as a zombie."""
    for r in records:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(r.pid, os.WNOHANG)

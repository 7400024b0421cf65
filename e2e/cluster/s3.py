"""A real S3-compatible server on 127.0.0.1 for tests, the e2e suite and the demo: versitygw over a temporary
directory (posix backend, object metadata in a sidecar directory so no extended attributes are needed).

    with S3Server() as s3:
        s3.client().create_bucket(Bucket="data")
        env = s3.env()            # AWS_* variables for a subprocess (a trainer run)

The binary comes from ``e2e/cluster/build.sh versitygw``; ``S3Server.binary()`` finds (or builds) it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

from e2e.cluster.procs import BUILD_SCRIPT, bin_dir, free_port


def upload_directory(client: Any, local: Path, bucket: str, prefix: str) -> list[str]:
    """Upload every file under ``local`` to ``s3://bucket/<prefix><relative path>`` with a boto3 ``client``
    (a model directory, for instance); returns the relative paths, sorted."""
    names = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    for name in names:
        client.upload_file(str(local / name), bucket, prefix + name)
    return names


class S3Server:
    """versitygw serving a fresh temporary directory; stopped (by PID) and removed on ``stop()``."""

    def __init__(
        self,
        access_key: str = "kubetune-root",
        secret_key: str = "kubetune-root-secret",
        region: str = "us-east-1",
        port: int | None = None,
        data_dir: Path | None = None,
    ) -> None:
        self.access_key = access_key
        self.secret_key = secret_key
        self.region = region
        self.port = port or free_port()
        self._own_dir = data_dir is None
        self.root = Path(data_dir or tempfile.mkdtemp(prefix="kubetune-s3-"))
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.root / "versitygw.log"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @staticmethod
    def binary() -> Path:
        """The versitygw binary, built from its Go module on first use."""
        path = bin_dir() / "versitygw"
        if not os.access(path, os.X_OK):
            subprocess.run(["bash", str(BUILD_SCRIPT), "versitygw"], check=True)
        return path

    def start(self, timeout: float = 30.0) -> S3Server:
        data = self.root / "data"
        sidecar = self.root / "meta"
        data.mkdir(parents=True, exist_ok=True)
        sidecar.mkdir(parents=True, exist_ok=True)
        command = [
            str(self.binary()),
            "--access",
            self.access_key,
            "--secret",
            self.secret_key,
            "--region",
            self.region,
            "--port",
            f"127.0.0.1:{self.port}",
            "--quiet",
            "posix",
            "--sidecar",
            str(sidecar),
            str(data),
        ]
        log = self.log_path.open("wb")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"versitygw exited with {self.process.returncode}: {self.log_path.read_text()[-2000:]}"
                )
            if self._answers():
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"versitygw did not answer on {self.endpoint} within {timeout:.0f}s")

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.endpoint + "/", timeout=1):
                return True
        except urllib.error.HTTPError:
            return True  # an S3 error document (403 for an unsigned request) means it is serving
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        self.process = None
        if self._own_dir:
            shutil.rmtree(self.root, ignore_errors=True)

    def client(self, access_key: str | None = None, secret_key: str | None = None) -> Any:
        """A boto3 S3 client for this server (path-style addressing)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.region,
            aws_access_key_id=access_key or self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
        )

    def env(self) -> dict[str, str]:
        """The variables a trainer (or any boto3 program) needs to reach this server as root."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

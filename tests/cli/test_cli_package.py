"""The krew package: the archive is reproducible, the manifest names its sha256, and the plugin runs from
the unpacked archive alone (no checkout, no installed package)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tarfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "plugins"))
import package


def test_the_manifest_and_archive_install_a_plugin_that_runs(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert (
        package.main(["--uri", "https://downloads.invalid/kubectl-finetune.tar.gz", "--out", str(out)]) == 0
    )
    data = (out / package.ARCHIVE_NAME).read_bytes()
    assert data == package.archive_bytes()  # reproducible
    manifest = yaml.safe_load((out / "finetune.yaml").read_text())
    assert manifest["kind"] == "Plugin" and manifest["metadata"]["name"] == "finetune"
    (platform,) = manifest["spec"]["platforms"]
    assert platform["sha256"] == hashlib.sha256(data).hexdigest()
    assert platform["uri"] == "https://downloads.invalid/kubectl-finetune.tar.gz"
    unpacked = tmp_path / "unpacked"
    with tarfile.open(out / package.ARCHIVE_NAME) as tar:
        tar.extractall(unpacked, filter="data")
    names = {str(p.relative_to(unpacked)) for p in unpacked.rglob("*") if p.is_file()}
    assert {"kubectl-finetune", "LICENSE", "kubetune_cli/main.py", "kubetune_cli/chart.py"} <= names
    # What krew's `files` rules copy, and nothing the plugin lacks: run it from there, outside the checkout.
    done = subprocess.run(
        [sys.executable, str(unpacked / "kubectl-finetune"), "--help"],
        capture_output=True, text=True, cwd=tmp_path, env={"PATH": "/usr/bin:/bin"}, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    for verb in ("list", "describe", "logs", "plot", "wait", "suspend", "resume", "cancel"):
        assert verb in done.stdout


def test_a_uri_krew_cannot_download_is_refused(tmp_path: Path) -> None:
    try:
        package.main(["--uri", "ftp://x/y.tgz", "--out", str(tmp_path)])
    except SystemExit as exc:
        assert exc.code == 2
    else:
        raise AssertionError("an ftp:// uri was accepted")

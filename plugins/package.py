"""Package `kubectl finetune` for krew: a reproducible archive (the launcher and kubetune_cli, nothing else)
and the manifest with its uri and sha256 filled in.

    python plugins/package.py --uri URL [--out DIR]

URL is where the archive will be published; the same sources always give the same archive bytes, so the
sha256 written here is the one users will download.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import sys
import tarfile
from pathlib import Path

PLUGINS = Path(__file__).resolve().parent
REPO = PLUGINS.parent
SOURCES = REPO / "operator" / "kubetune_cli"
ARCHIVE_NAME = "kubectl-finetune.tar.gz"
LICENSE_TEXT = "Apache-2.0 (see the kubetune repository).\n"


def archive_bytes() -> bytes:
    """The archive: kubectl-finetune, kubetune_cli/*.py and LICENSE, with fixed owners and times."""
    members = [("kubectl-finetune", (PLUGINS / "kubectl-finetune").read_bytes(), 0o755)]
    members += [(f"kubetune_cli/{p.name}", p.read_bytes(), 0o644) for p in sorted(SOURCES.glob("*.py"))]
    members.append(("LICENSE", LICENSE_TEXT.encode(), 0o644))
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data, mode in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), mode, 0
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue(), mtime=0)


def manifest_text(uri: str, sha256: str) -> str:
    template = (PLUGINS / "finetune.yaml").read_text()
    return template.replace("PACKAGED_ARCHIVE_URI", uri).replace("PACKAGED_ARCHIVE_SHA256", sha256)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python plugins/package.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--uri", required=True, help="where the archive will be published (https://...)")
    parser.add_argument("--out", type=Path, default=REPO / "out", help="directory to write to (default out/)")
    args = parser.parse_args(argv)
    if not args.uri.startswith(("https://", "http://")):
        parser.error(f"--uri {args.uri!r}: krew downloads the archive, so give an http(s) URL")
    data = archive_bytes()
    sha256 = hashlib.sha256(data).hexdigest()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / ARCHIVE_NAME).write_bytes(data)
    (args.out / "finetune.yaml").write_text(manifest_text(args.uri, sha256))
    print(f"{args.out / ARCHIVE_NAME}  sha256 {sha256}\n{args.out / 'finetune.yaml'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

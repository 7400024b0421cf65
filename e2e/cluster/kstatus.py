"""Ask the kstatus library (sigs.k8s.io/cli-utils, what Flux and kpt judge health with) about objects,
through the small program built from e2e/tools/kstatus."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from e2e.cluster.cluster import bin_dir


def kstatus_tool() -> Path:
    return bin_dir() / "kstatus"


def kstatus_verdict(obj: dict[str, Any]) -> dict[str, str]:
    """{"status": InProgress | Current | Failed | ..., "message": ...} for one object as the API holds it."""
    tool = kstatus_tool()
    if not tool.exists():
        raise FileNotFoundError(f"kstatus is not built yet ({tool}); run `bash e2e/cluster/build.sh kstatus`")
    result = subprocess.run([str(tool)], input=json.dumps(obj), capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"kstatus failed ({result.returncode}): {result.stderr.strip()}")
    verdict: dict[str, str] = json.loads(result.stdout)
    return verdict

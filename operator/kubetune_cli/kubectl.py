"""The one module that reaches the cluster: it runs the `kubectl` this plugin belongs to."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

RESOURCE = "finetunejobs.kubetune.io"
REQUEST_TIMEOUT = "30s"
"""kubectl's --request-timeout for reads and writes: a cluster that does not answer is reported, not
waited on forever."""


class CliError(Exception):
    """A problem the user can act on; main() prints it and exits with ``exit_code``."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Kubectl:
    """kubectl with the user's --kubeconfig and --context. ``namespace`` None means kubectl's default (the
    context's namespace); ``all_namespaces`` lists across namespaces."""

    kubeconfig: str | None = None
    context: str | None = None
    namespace: str | None = None
    all_namespaces: bool = False
    binary: str = ""

    def argv(self, *args: str, namespaced: bool = True) -> list[str]:
        argv = [self.binary or _find_kubectl()]
        if self.kubeconfig:
            argv += ["--kubeconfig", self.kubeconfig]
        if self.context:
            argv += ["--context", self.context]
        if namespaced and self.namespace:
            argv += ["--namespace", self.namespace]
        return [*argv, *args]

    def run(self, *args: str, namespaced: bool = True) -> str:
        """kubectl's stdout; a failure raises CliError with kubectl's own message."""
        argv = self.argv(*args, f"--request-timeout={REQUEST_TIMEOUT}", namespaced=namespaced)
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        except subprocess.TimeoutExpired as exc:
            raise CliError(f"`{' '.join(argv)}` did not finish within 120 s") from exc
        if done.returncode != 0:
            detail = done.stderr.strip() or f"exit code {done.returncode}"
            raise CliError(f"kubectl {' '.join(args[:2])} failed: {detail}")
        return done.stdout

    def get_json(self, *args: str, namespaced: bool = True) -> dict[str, Any]:
        text = self.run("get", *args, "--output=json", namespaced=namespaced)
        try:
            obj = json.loads(text)
        except ValueError as exc:
            raise CliError(f"kubectl get {' '.join(args)} did not return JSON: {exc}") from exc
        if not isinstance(obj, dict):
            raise CliError(f"kubectl get {' '.join(args)} returned {type(obj).__name__}, not an object")
        return obj

    def job(self, name: str) -> dict[str, Any]:
        return self.get_json(RESOURCE, name)

    def jobs(self) -> list[dict[str, Any]]:
        scope = ["--all-namespaces"] if self.all_namespaces else []
        items = self.get_json(RESOURCE, *scope).get("items")
        return [item for item in items if isinstance(item, dict)] if isinstance(items, list) else []

    def pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        items = self.in_namespace(namespace).get_json("pods", f"--selector={selector}").get("items")
        return [item for item in items if isinstance(item, dict)] if isinstance(items, list) else []

    def in_namespace(self, namespace: str) -> Kubectl:
        return Kubectl(self.kubeconfig, self.context, namespace, False, self.binary)

    def stream(self, *args: str) -> Iterator[str]:
        """Lines of a long-running kubectl command (``logs -f``), as they come."""
        argv = self.argv(*args)
        with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
            assert proc.stdout is not None and proc.stderr is not None
            yield from proc.stdout
            error = proc.stderr.read().strip()
            if proc.wait() != 0:
                raise CliError(f"kubectl {' '.join(args[:2])} failed: {error or proc.returncode}")

    def kubeconfig_paths(self) -> Sequence[str]:
        """The kubeconfig files kubectl reads, in its order."""
        if self.kubeconfig:
            return [self.kubeconfig]
        env = os.environ.get("KUBECONFIG")
        if env:
            return [p for p in env.split(os.pathsep) if p]
        return [os.path.join(os.path.expanduser("~"), ".kube", "config")]


def _find_kubectl() -> str:
    found = os.environ.get("KUBECTL") or shutil.which("kubectl")
    if not found:
        raise CliError(
            "kubectl is not on PATH; install kubectl (this is a kubectl plugin) or set KUBECTL to its path"
        )
    return found

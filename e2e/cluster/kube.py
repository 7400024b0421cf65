"""A small JSON client for the Kubernetes REST API, used by the launcher, the node agent and the e2e tests.

It speaks plain paths (``/api/v1/namespaces/x/pods``) so a test reads like the API it exercises, and it
surfaces the server's own error message (``ApiError.message``), which is what the CRD tests assert on.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
import yaml

JSON = dict[str, Any]

MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
JSON_PATCH = "application/json-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"


class ApiError(Exception):
    """A non-2xx answer; ``message`` is the API server's Status message."""

    def __init__(self, method: str, path: str, status: int, body: str) -> None:
        self.status = status
        self.reason = ""
        self.message = body
        self.body: JSON = {}
        try:
            parsed = json.loads(body)
            if isinstance(parsed, dict):
                self.body = parsed
                self.reason = str(parsed.get("reason", ""))
                self.message = str(parsed.get("message", body))
        except ValueError:
            pass
        super().__init__(f"{method} {path}: HTTP {status} {self.reason}: {self.message}")


@dataclass(frozen=True)
class Credentials:
    server: str
    ca_file: str
    cert_file: str | None = None
    key_file: str | None = None
    token: str | None = None


def load_kubeconfig(path: str | Path) -> Credentials:
    """Read the current context of a kubeconfig that uses file paths (as the launcher writes them)."""
    doc = yaml.safe_load(Path(path).read_text())
    context_name = doc.get("current-context")
    context = next(c["context"] for c in doc["contexts"] if c["name"] == context_name)
    cluster = next(c["cluster"] for c in doc["clusters"] if c["name"] == context["cluster"])
    user = next(u["user"] for u in doc["users"] if u["name"] == context["user"])
    return Credentials(
        server=cluster["server"],
        ca_file=cluster["certificate-authority"],
        cert_file=user.get("client-certificate"),
        key_file=user.get("client-key"),
        token=user.get("token"),
    )


class KubeClient:
    def __init__(self, creds: Credentials, timeout: float = 30.0) -> None:
        self.creds = creds
        self.server = creds.server.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()
        # Without this, $REQUESTS_CA_BUNDLE would override the cluster's CA on every request.
        self.session.trust_env = False
        self.session.verify = creds.ca_file
        if creds.cert_file and creds.key_file:
            self.session.cert = (creds.cert_file, creds.key_file)
        if creds.token:
            self.session.headers["Authorization"] = f"Bearer {creds.token}"

    @classmethod
    def from_kubeconfig(cls, path: str | Path, timeout: float = 30.0) -> KubeClient:
        return cls(load_kubeconfig(path), timeout)

    def close(self) -> None:
        self.session.close()

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        params: dict[str, Any] | None = None,
        content_type: str = "application/json",
        timeout: float | None = None,
    ) -> JSON:
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": content_type, "Accept": "application/json"}
        resp = self.session.request(
            method,
            self.server + path,
            data=data,
            params=params,
            headers=headers,
            timeout=timeout or self.timeout,
        )
        if resp.status_code >= 300:
            raise ApiError(method, path, resp.status_code, resp.text)
        if not resp.content:
            return {}
        result: JSON = resp.json()
        return result

    def get(self, path: str, **params: Any) -> JSON:
        return self.request("GET", path, params=params or None)

    def get_or_none(self, path: str) -> JSON | None:
        try:
            return self.get(path)
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    def create(self, path: str, body: JSON) -> JSON:
        return self.request("POST", path, body)

    def replace(self, path: str, body: JSON) -> JSON:
        return self.request("PUT", path, body)

    def patch(self, path: str, body: Any, content_type: str = MERGE_PATCH) -> JSON:
        return self.request("PATCH", path, body, content_type=content_type)

    def delete(self, path: str, body: JSON | None = None, **params: Any) -> JSON:
        return self.request("DELETE", path, body, params=params or None)

    def delete_if_exists(self, path: str, body: JSON | None = None) -> None:
        try:
            self.delete(path, body)
        except ApiError as e:
            if e.status != 404:
                raise

    def apply_yaml(self, path: str, manifest: JSON) -> JSON:
        """Create ``manifest`` under collection ``path``, or replace it if it exists."""
        try:
            return self.create(path, manifest)
        except ApiError as e:
            if e.status != 409:
                raise
        name = manifest["metadata"]["name"]
        # A controller may write the object between the read and the replace (409 again): read it again, as
        # kubectl's client-side apply does.
        for attempt in range(5):
            current = self.get(f"{path}/{name}")
            replacing = dict(manifest)
            replacing["metadata"] = {
                **manifest["metadata"],
                "resourceVersion": current["metadata"]["resourceVersion"],
            }
            try:
                return self.replace(f"{path}/{name}", replacing)
            except ApiError as e:
                if e.status != 409 or attempt == 4:
                    raise
        raise AssertionError("unreachable")

    def server_side_apply(self, path: str, manifest: JSON, manager: str = "kubetune-e2e") -> JSON:
        """``kubectl apply --server-side --force-conflicts``: ``path`` is the collection, the name comes from
        the manifest."""
        return self.request(
            "PATCH",
            f"{path}/{manifest['metadata']['name']}",
            manifest,
            params={"fieldManager": manager, "force": "true"},
            content_type=APPLY_PATCH,
        )

    def watch(self, path: str, *, timeout_seconds: int = 60, **params: Any) -> Iterator[JSON]:
        """Yield watch events ({type, object}) until the server closes the stream."""
        query = {"watch": "true", "timeoutSeconds": str(timeout_seconds), "allowWatchBookmarks": "true"}
        query.update({k: str(v) for k, v in params.items()})
        with self.session.get(
            self.server + path, params=query, stream=True, timeout=(10, timeout_seconds + 15)
        ) as resp:
            if resp.status_code >= 300:
                raise ApiError("WATCH", path, resp.status_code, resp.text)
            for line in resp.iter_lines():
                if line:
                    yield json.loads(line)

    def wait_for(
        self,
        path: str,
        predicate: Any,
        *,
        timeout: float = 60.0,
        interval: float = 0.2,
        what: str = "",
    ) -> JSON:
        """Poll ``path`` until ``predicate(obj)`` is truthy; on timeout, fail with the last object seen."""
        deadline = time.monotonic() + timeout
        last: JSON | None = None
        while True:
            last = self.get_or_none(path)
            if last is not None and predicate(last):
                return last
            if time.monotonic() > deadline:
                shown = json.dumps(last.get("status") if last else None, indent=1)[:3000]
                raise TimeoutError(
                    f"timed out after {timeout:.0f}s waiting for {what or path}; last status: {shown}"
                )
            time.sleep(interval)

    def wait_gone(self, path: str, *, timeout: float = 60.0, interval: float = 0.2) -> None:
        deadline = time.monotonic() + timeout
        while self.get_or_none(path) is not None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {path} to be deleted")
            time.sleep(interval)


def b64(text: str | bytes) -> str:
    raw = text.encode() if isinstance(text, str) else text
    return base64.b64encode(raw).decode()

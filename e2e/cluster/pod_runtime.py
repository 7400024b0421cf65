"""What the node agent does for one pod: volumes, env, containers as local processes, and the pod's status.

Each container runs in its own mount namespace (``unshare --mount``) where the pod's volumes and the
termination-message file are bind-mounted at their real paths, so the program under test opens
``/etc/kubetune/config.json`` and writes ``/dev/termination-log`` exactly as it would in a container. Its
UTS namespace carries the pod's hostname, and its /etc/hosts is the pod's hosts file (pod_dns), which the
agent rewrites in place as the pods that share a headless Service come and go.
Mount points that do not exist on the host are created there once (empty directories or files).
Not enforced: runAsUser/runAsNonRoot/readOnlyRootFilesystem/capabilities (the agent runs as root),
resource limits, liveness and startup probes, image pulls.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import fnmatch
import json
import logging
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
import yaml

from e2e.cluster.kube import STRATEGIC_MERGE_PATCH, ApiError, KubeClient
from e2e.cluster.pod_dns import PodRecord, hosts_file, pod_hostname, write_in_place

log = logging.getLogger("node-agent")

JSON = dict[str, Any]
DEFAULT_TERMINATION_PATH = "/dev/termination-log"
TERMINATION_MESSAGE_MAX = 4096
FALLBACK_LOG_LINES = 80
FALLBACK_LOG_BYTES = 2048
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ConfigError(Exception):
    """A container cannot be configured (missing Secret/ConfigMap key, unknown image): reported as waiting."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


# ---- images -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageRule:
    match: str
    entrypoint: tuple[str, ...]
    cmd: tuple[str, ...]
    env: dict[str, str]


@dataclass(frozen=True)
class ImageMap:
    rules: tuple[ImageRule, ...]
    programs: dict[str, str]
    python: str

    @classmethod
    def load(cls, path: Path, python: str) -> ImageMap:
        doc = yaml.safe_load(path.read_text()) or {}
        rules = []
        for i, entry in enumerate(doc.get("images", [])):
            if "match" not in entry:
                raise ValueError(f"{path}: images[{i}] has no 'match' glob")
            rules.append(
                ImageRule(
                    match=entry["match"],
                    entrypoint=tuple(entry.get("entrypoint", [])),
                    cmd=tuple(entry.get("cmd", [])),
                    env={k: str(v) for k, v in (entry.get("env") or {}).items()},
                )
            )
        return cls(tuple(rules), dict(doc.get("programs") or {}), python)

    def _sub(self, word: str) -> str:
        return word.replace("{python}", self.python)

    def resolve(self, image: str, command: list[str], args: list[str]) -> tuple[list[str], dict[str, str]]:
        """argv and image env for a container, with Kubernetes' command/args over ENTRYPOINT/CMD rules."""
        rule = next((r for r in self.rules if fnmatch.fnmatchcase(image, r.match)), None)
        if rule is None:
            raise ConfigError(
                "ErrImagePull",
                f'image "{image}" has no local entry point; add a rule for it to e2e/cluster/images.yaml',
            )
        if command:
            argv = [*command, *args]
            if argv and argv[0] in self.programs:
                argv[0] = self.programs[argv[0]]
        else:
            argv = [*rule.entrypoint, *(args if args else rule.cmd)]
        argv = [self._sub(a) for a in argv]
        if not argv:
            raise ConfigError(
                "CreateContainerError", f'image "{image}" has no entry point and the pod gives no command'
            )
        return argv, {k: self._sub(v) for k, v in rule.env.items()}


# ---- $(VAR) expansion, fieldRef, resourceFieldRef ------------------------------------------------------

_VAR_RE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: defined names are replaced, undefined ones stay, $$ is a literal $."""

    def repl(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env[name] if name in env else m.group(0)

    return _VAR_RE.sub(repl, text)


_SUBSCRIPT_RE = re.compile(r"^metadata\.(labels|annotations)\['(.+)'\]$")


def field_value(pod: JSON, path: str, pod_ip: str, host_ip: str) -> str:
    meta = pod.get("metadata", {})
    spec = pod.get("spec", {})
    simple = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        "status.podIP": pod_ip,
        "status.podIPs": pod_ip,
        "status.hostIP": host_ip,
        "status.hostIPs": host_ip,
    }
    if path in simple:
        return str(simple[path])
    m = _SUBSCRIPT_RE.match(path)
    if m:
        return str((meta.get(m.group(1)) or {}).get(m.group(2), ""))
    if path in ("metadata.labels", "metadata.annotations"):
        items = meta.get(path.split(".")[1]) or {}
        return "\n".join(f'{k}="{v}"' for k, v in sorted(items.items()))
    raise ConfigError("CreateContainerConfigError", f"unsupported fieldRef fieldPath {path!r}")


_QUANTITY_RE = re.compile(r"^([0-9.]+)([a-zA-Z]*)$")
_SUFFIX = {
    "": 1,
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "Ki": 1024,
    "Mi": 1024**2,
    "Gi": 1024**3,
    "Ti": 1024**4,
}


def quantity(text: str) -> float:
    m = _QUANTITY_RE.match(str(text))
    if not m or m.group(2) not in _SUFFIX:
        raise ConfigError("CreateContainerConfigError", f"cannot parse quantity {text!r}")
    return float(m.group(1)) * _SUFFIX[m.group(2)]


def resource_value(container: JSON, ref: JSON, node_allocatable: dict[str, str]) -> str:
    resource = ref["resource"]
    kind, _, name = resource.partition(".")
    value = (container.get("resources", {}).get(kind) or {}).get(name)
    if value is None and kind == "limits":
        value = node_allocatable.get(name, "0")
    if value is None:
        value = "0"
    divisor = quantity(ref.get("divisor", "1"))
    return str(math.ceil(quantity(value) / divisor))


# ---- probes -------------------------------------------------------------------------------------------


@dataclass
class ProbeState:
    spec: JSON
    next_at: float
    successes: int = 0
    failures: int = 0


def run_probe(probe: JSON, pod_ip: str, container: JSON, pid: int | None, env: dict[str, str]) -> bool:
    timeout = float(probe.get("timeoutSeconds", 1))
    ports = {p.get("name"): p["containerPort"] for p in container.get("ports", []) if p.get("name")}

    def port_of(value: Any) -> int:
        return int(ports[value]) if isinstance(value, str) and value in ports else int(value)

    try:
        if "httpGet" in probe:
            g = probe["httpGet"]
            scheme = g.get("scheme", "HTTP").lower()
            url = f"{scheme}://{g.get('host') or pod_ip}:{port_of(g['port'])}{g.get('path', '/')}"
            headers = {h["name"]: h["value"] for h in g.get("httpHeaders", [])}
            resp = requests.get(url, headers=headers, timeout=timeout, verify=False)
            return 200 <= resp.status_code < 400
        if "tcpSocket" in probe:
            t = probe["tcpSocket"]
            with socket.create_connection((t.get("host") or pod_ip, port_of(t["port"])), timeout=timeout):
                return True
        if "exec" in probe and pid is not None:
            argv = ["nsenter", f"--target={pid}", "--mount", "--", *probe["exec"]["command"]]
            return subprocess.run(argv, env=env, capture_output=True, timeout=timeout).returncode == 0
    except (requests.RequestException, OSError, subprocess.TimeoutExpired, ValueError):
        return False
    return False


# ---- containers ---------------------------------------------------------------------------------------


@dataclass
class ContainerRun:
    spec: JSON
    init: bool = False
    proc: subprocess.Popen[bytes] | None = None
    restart_count: int = 0
    started_at: str | None = None
    waiting: tuple[str, str] | None = ("ContainerCreating", "")
    terminated: JSON | None = None
    last_terminated: JSON | None = None
    ready: bool = False
    next_start: float = 0.0
    log_offset: int = 0
    env: dict[str, str] = field(default_factory=dict)
    readiness: ProbeState | None = None

    @property
    def name(self) -> str:
        return str(self.spec["name"])

    @property
    def running(self) -> bool:
        return self.proc is not None and self.terminated is None

    def status(self, image_id: str) -> JSON:
        # Explicit nulls: the status is sent as a strategic merge patch, which would otherwise keep the
        # previous state next to the new one.
        state: JSON = {"waiting": None, "running": None, "terminated": None}
        if self.running:
            state["running"] = {"startedAt": self.started_at}
        elif self.terminated is not None:
            state["terminated"] = self.terminated
        else:
            reason, message = self.waiting or ("ContainerCreating", "")
            state["waiting"] = {"reason": reason, **({"message": message} if message else {})}
        out: JSON = {
            "name": self.name,
            "image": self.spec.get("image", ""),
            "imageID": image_id,
            "ready": self.ready and self.running,
            "started": self.running,
            "restartCount": self.restart_count,
            "state": state,
            "lastState": {"terminated": self.last_terminated},
        }
        if self.proc is not None:
            out["containerID"] = f"local://{self.proc.pid}"
        return out


class PodWorker(threading.Thread):
    """Runs one pod's containers and keeps its status in the API server until the pod is gone."""

    def __init__(
        self,
        client: KubeClient,
        pod: JSON,
        *,
        node: NodeContext,
        pod_ip: str,
        release_ip: Callable[[str], None],
    ) -> None:
        super().__init__(daemon=True, name=f"pod-{pod['metadata']['namespace']}/{pod['metadata']['name']}")
        self.client = client
        self.node = node
        self.pod = pod
        self.uid = pod["metadata"]["uid"]
        self.ns = pod["metadata"]["namespace"]
        self.pod_name = pod["metadata"]["name"]
        self.pod_ip = pod_ip
        self.release_ip = release_ip
        self.dir = node.pods_dir / self.ns / self.pod_name
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.gone = False
        self.inits = [ContainerRun(c, init=True) for c in pod["spec"].get("initContainers", [])]
        self.containers = [ContainerRun(c) for c in pod["spec"]["containers"]]
        self.start_time = now()
        self.started_mono = time.monotonic()
        self.conditions: dict[str, JSON] = {}
        self.last_posted: JSON | None = None
        self.volumes_ready = False
        self.volume_paths: dict[str, Path] = {}
        self.deadline_exceeded = False
        self.finished = False

    # -- inputs from the agent's sync loop --

    def update(self, pod: JSON) -> None:
        with self.lock:
            self.pod = pod
        self.wake.set()

    def mark_gone(self) -> None:
        self.gone = True
        self.wake.set()

    @property
    def hosts_path(self) -> Path:
        return self.dir / "etc-hosts"

    def set_hosts(self, known: list[PodRecord]) -> None:
        """Rewrite the pod's /etc/hosts for the published pods the agent knows of (pod_dns)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if write_in_place(self.hosts_path, hosts_file(self._current(), self.pod_ip, known)):
            log.info("hosts of %s/%s: %d peer names", self.ns, self.pod_name, len(known))

    # -- the loop --

    def run(self) -> None:
        try:
            self._run()
        except Exception:
            log.exception("pod worker %s/%s crashed", self.ns, self.pod_name)
            self._kill_all(grace=0)
        finally:
            self.release_ip(self.pod_ip)
            self.client.close()

    def _current(self) -> JSON:
        with self.lock:
            return self.pod

    def _run(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "pod.json").write_text(json.dumps({"uid": self.uid, "podIP": self.pod_ip}))
        if not self.hosts_path.exists():
            self.set_hosts([])
        self._post_status()
        while True:
            pod = self._current()
            if self.gone:
                self._kill_all(grace=0)
                return
            if pod["metadata"].get("deletionTimestamp"):
                grace = pod["metadata"].get("deletionGracePeriodSeconds")
                if grace is None:
                    grace = pod["spec"].get("terminationGracePeriodSeconds", 30)
                self._kill_all(grace=float(grace))
                self.finished = True
                self._post_status(final=True)
                self._finalize_delete()
                return
            if not self.finished:
                self._step(pod)
                self._post_status()
            self.wake.wait(0.2)
            self.wake.clear()

    def _step(self, pod: JSON) -> None:
        deadline = pod["spec"].get("activeDeadlineSeconds")
        if deadline is not None and time.monotonic() - self.started_mono > float(deadline):
            self.deadline_exceeded = True
            self._kill_all(grace=float(pod["spec"].get("terminationGracePeriodSeconds", 30)))
            self.finished = True
            return
        if not self.volumes_ready:
            try:
                self._prepare_volumes(pod)
                self.volumes_ready = True
            except ConfigError as e:
                for c in self.inits + self.containers:
                    c.waiting = (e.reason, e.message)
                return
        policy = pod["spec"].get("restartPolicy", "Always")
        for init in self.inits:
            self._supervise(init, "Never" if policy == "Never" else "OnFailure")
            if init.terminated is None or init.terminated.get("exitCode") != 0:
                if init.terminated is not None and policy == "Never":
                    self.finished = True
                return
        for c in self.containers:
            self._supervise(c, policy)
        if self._phase() in ("Succeeded", "Failed"):
            self.finished = True

    def _supervise(self, c: ContainerRun, policy: str) -> None:
        if c.running:
            assert c.proc is not None
            code = c.proc.poll()
            if code is None:
                self._probe(c)
                return
            self._record_exit(c, code)
        if c.terminated is not None:
            code = int(c.terminated["exitCode"])
            again = policy == "Always" or (policy == "OnFailure" and code != 0)
            if not again or time.monotonic() < c.next_start:
                return
            c.last_terminated, c.terminated, c.proc = c.terminated, None, None
            c.restart_count += 1
        if time.monotonic() >= c.next_start:
            self._start(c)

    def _start(self, c: ContainerRun) -> None:
        pod = self._current()
        try:
            env = self._container_env(pod, c.spec)
            command = [expand(a, env) for a in c.spec.get("command", [])]
            args = [expand(a, env) for a in c.spec.get("args", [])]
            argv, image_env = self.node.images.resolve(c.spec.get("image", ""), command, args)
        except ConfigError as e:
            c.waiting = (e.reason, e.message)
            c.proc = None
            c.next_start = time.monotonic() + 1.0
            return
        full_env = {**image_env, **env}
        host_network = bool(pod["spec"].get("hostNetwork"))
        # A hostNetwork pod keeps the node's name and hosts file, as under a kubelet.
        naming = [] if host_network else [f"hostname {shlex.quote(pod_hostname(pod))}"]
        script = ["set -e", *naming, *self._mount_script(c)]
        workdir = c.spec.get("workingDir") or "/"
        script.append(f"cd {shlex.quote(workdir)}")
        script.append('exec "$@"')
        wrapper = [
            "unshare",
            "--mount",
            *([] if host_network else ["--uts"]),
            "--propagation",
            "private",
            "--",
            "/bin/sh",
            "-c",
            "\n".join(script),
            c.name,
            *argv,
        ]
        logfile = self.log_path(c.name)
        logfile.parent.mkdir(parents=True, exist_ok=True)
        c.log_offset = logfile.stat().st_size if logfile.exists() else 0
        term = self._termination_file(c.name)
        term.write_bytes(b"")
        with logfile.open("ab") as out:
            c.proc = subprocess.Popen(
                wrapper,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=full_env,
                start_new_session=True,
            )
        c.env = full_env
        c.started_at = now()
        c.waiting = None
        c.ready = "readinessProbe" not in c.spec and not c.init
        if "readinessProbe" in c.spec:
            probe = c.spec["readinessProbe"]
            c.readiness = ProbeState(probe, time.monotonic() + float(probe.get("initialDelaySeconds", 0)))
        log.info("started %s/%s container %s pid %d: %s", self.ns, self.pod_name, c.name, c.proc.pid, argv)

    def _probe(self, c: ContainerRun) -> None:
        st = c.readiness
        if st is None or time.monotonic() < st.next_at:
            return
        st.next_at = time.monotonic() + float(st.spec.get("periodSeconds", 10))
        ok = run_probe(st.spec, self.pod_ip, c.spec, c.proc.pid if c.proc else None, c.env)
        if ok:
            st.successes, st.failures = st.successes + 1, 0
            if st.successes >= int(st.spec.get("successThreshold", 1)):
                c.ready = True
        else:
            st.failures, st.successes = st.failures + 1, 0
            if st.failures >= int(st.spec.get("failureThreshold", 3)):
                c.ready = False

    def _record_exit(self, c: ContainerRun, code: int, reason: str | None = None) -> None:
        exit_code = 128 - code if code < 0 else code
        message = self._termination_message(c, exit_code)
        c.terminated = {
            "exitCode": exit_code,
            "reason": reason or ("Completed" if exit_code == 0 else "Error"),
            "startedAt": c.started_at,
            "finishedAt": now(),
            "containerID": f"local://{c.proc.pid if c.proc else 0}",
        }
        if code < 0:
            c.terminated["signal"] = -code
        if message:
            c.terminated["message"] = message
        c.ready = False
        backoff = min(10.0, 0.5 * (2 ** min(c.restart_count, 5)))
        c.next_start = time.monotonic() + backoff
        log.info("%s/%s container %s exited with %d", self.ns, self.pod_name, c.name, exit_code)

    def _termination_message(self, c: ContainerRun, exit_code: int) -> str:
        path = self._termination_file(c.name)
        text = path.read_bytes()[:TERMINATION_MESSAGE_MAX].decode(errors="replace") if path.exists() else ""
        policy = c.spec.get("terminationMessagePolicy", "File")
        if not text and exit_code != 0 and policy == "FallbackToLogsOnError":
            logfile = self.log_path(c.name)
            if logfile.exists():
                with logfile.open("rb") as f:
                    f.seek(c.log_offset)
                    tail = f.read().decode(errors="replace").splitlines()[-FALLBACK_LOG_LINES:]
                text = "\n".join(tail)[-FALLBACK_LOG_BYTES:]
        return text

    def _kill_all(self, grace: float) -> None:
        live = [c for c in self.inits + self.containers if c.running]
        for c in live:
            _killpg(c.proc, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(c.proc and c.proc.poll() is None for c in live):
            time.sleep(0.05)
        for c in live:
            assert c.proc is not None
            if c.proc.poll() is None:
                _killpg(c.proc, signal.SIGKILL)
            code = c.proc.wait()
            self._record_exit(c, code)
        for c in self.inits + self.containers:
            # A container that never started ends as terminated too, as the kubelet reports it.
            if c.proc is None and c.terminated is None:
                c.terminated = {"exitCode": 137, "reason": "ContainerStatusUnknown"}
                c.waiting = None

    # -- volumes, mounts, env --

    def log_path(self, container: str) -> Path:
        return self.dir / "logs" / f"{container}.log"

    def _termination_file(self, container: str) -> Path:
        path = self.dir / "termination" / container
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def _prepare_volumes(self, pod: JSON) -> None:
        base = self.dir / "volumes"
        for vol in pod["spec"].get("volumes", []):
            name = vol["name"]
            target = base / name
            if "emptyDir" in vol:
                target.mkdir(parents=True, exist_ok=True)
            elif "configMap" in vol:
                self._write_items(target, self._configmap(vol["configMap"]), vol["configMap"])
            elif "secret" in vol:
                src = vol["secret"]
                data = self._secret({"name": src.get("secretName"), "optional": src.get("optional")})
                self._write_items(target, data, src)
            elif "projected" in vol:
                self._write_projected(target, vol["projected"])
            elif "downwardAPI" in vol:
                files = {
                    i["path"]: field_value(pod, i["fieldRef"]["fieldPath"], self.pod_ip, self.node.host_ip)
                    for i in vol["downwardAPI"].get("items", [])
                    if "fieldRef" in i
                }
                self._write_files(target, {k: v.encode() for k, v in files.items()}, vol["downwardAPI"])
            elif "hostPath" in vol:
                target = Path(vol["hostPath"]["path"])
            else:
                raise ConfigError("FailedMount", f"volume {name!r}: type not supported by the node agent")
            self.volume_paths[name] = target

    def _configmap(self, ref: JSON) -> dict[str, bytes]:
        cm = self._referenced("configmap", ref)
        data = {k: v.encode() for k, v in (cm.get("data") or {}).items()}
        data.update({k: base64.b64decode(v) for k, v in (cm.get("binaryData") or {}).items()})
        return data

    def _secret(self, ref: JSON) -> dict[str, bytes]:
        secret = self._referenced("secret", ref)
        return {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}

    def _referenced(self, kind: str, ref: JSON) -> JSON:
        """The ConfigMap or Secret (``kind``) a pod names; empty when it is missing and ``optional``."""
        found = self.client.get_or_none(f"/api/v1/namespaces/{self.ns}/{kind}s/{ref['name']}")
        if found is None:
            if ref.get("optional"):
                return {}
            raise ConfigError("CreateContainerConfigError", f'{kind} "{ref["name"]}" not found')
        return found

    def _select(self, data: dict[str, bytes], source: JSON) -> dict[str, bytes]:
        items = source.get("items")
        if not items:
            return dict(data)
        out = {}
        for item in items:
            if item["key"] not in data:
                if source.get("optional"):
                    continue
                raise ConfigError("CreateContainerConfigError", f"key {item['key']!r} not found in {source}")
            out[item["path"]] = data[item["key"]]
        return out

    def _write_items(self, target: Path, data: dict[str, bytes], source: JSON) -> None:
        self._write_files(target, self._select(data, source), source)

    def _write_files(self, target: Path, files: dict[str, bytes], source: JSON) -> None:
        target.mkdir(parents=True, exist_ok=True)
        mode = int(source.get("defaultMode", 0o644))
        for rel, content in files.items():
            path = target / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
            path.chmod(mode)

    def _write_projected(self, target: Path, projected: JSON) -> None:
        files: dict[str, bytes] = {}
        pod = self._current()
        for source in projected.get("sources", []):
            if "serviceAccountToken" in source:
                files[source["serviceAccountToken"]["path"]] = self._token(
                    source["serviceAccountToken"]
                ).encode()
            elif "configMap" in source:
                files.update(self._select(self._configmap(source["configMap"]), source["configMap"]))
            elif "secret" in source:
                files.update(self._select(self._secret(source["secret"]), source["secret"]))
            elif "downwardAPI" in source:
                for item in source["downwardAPI"].get("items", []):
                    if "fieldRef" in item:
                        value = field_value(
                            pod, item["fieldRef"]["fieldPath"], self.pod_ip, self.node.host_ip
                        )
                        files[item["path"]] = value.encode()
        self._write_files(target, files, projected)

    def _token(self, source: JSON) -> str:
        """A bound service-account token for this pod, from the TokenRequest API (as the kubelet gets one)."""
        sa = self._current()["spec"].get("serviceAccountName", "default")
        spec: JSON = {
            "expirationSeconds": int(source.get("expirationSeconds", 3607)),
            "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": self.pod_name, "uid": self.uid},
        }
        if source.get("audience"):
            spec["audiences"] = [source["audience"]]
        try:
            resp = self.client.create(
                f"/api/v1/namespaces/{self.ns}/serviceaccounts/{sa}/token",
                {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec},
            )
        except ApiError as e:
            raise ConfigError("FailedMount", f"service account token for {sa!r}: {e.message}") from e
        return str(resp["status"]["token"])

    def _mount_script(self, c: ContainerRun) -> list[str]:
        """Shell lines that mount the container's volumes at their real paths.

        A volume may hide a host path the container still needs: an emptyDir at /tmp hides a checkout, a
        virtual environment or this agent's own pod directories when they live under /tmp. So every source
        is first bound into a staging directory, then mounted at its destination, and the host paths the
        processes need (the node's keep_paths) are bound back on top wherever a volume hid them.
        """
        mounts = self._mounts(c)
        destinations = [Path(dst) for _, dst, _ in mounts]
        hidden = [
            keep
            for keep in self.node.keep_paths
            if any(keep != dst and keep.is_relative_to(dst) for dst in destinations)
        ]
        stage = self.node.stage_root / f"{self.uid}-{c.name}"
        if stage.exists():
            shutil.rmtree(stage)
        stage.mkdir(parents=True)
        q = shlex.quote
        lines: list[str] = []
        for i, (src, _, _) in enumerate(mounts):
            staged = stage / f"v{i}"
            if src.is_dir():
                staged.mkdir()
            else:
                staged.touch()
            lines.append(f"mount --bind {q(str(src))} {q(str(staged))}")
        for j, keep in enumerate(hidden):
            (stage / f"k{j}").mkdir()
            lines.append(f"mount --bind {q(str(keep))} {q(str(stage / f'k{j}'))}")
        for i, (_, dst, ro) in enumerate(mounts):
            lines.append(f"mount --bind {q(str(stage / f'v{i}'))} {q(dst)}")
            if ro:
                lines.append(f"mount -o remount,bind,ro {q(dst)}")
        for j, keep in enumerate(hidden):
            lines.append(f"mkdir -p {q(str(keep))}")
            lines.append(f"mount --bind {q(str(stage / f'k{j}'))} {q(str(keep))}")
        return lines

    def _mounts(self, c: ContainerRun) -> list[tuple[Path, str, bool]]:
        mounts: list[tuple[Path, str, bool]] = []
        for m in c.spec.get("volumeMounts", []):
            src = self.volume_paths[m["name"]]
            if m.get("subPath"):
                src = src / m["subPath"]
                if not src.exists():
                    src.mkdir(parents=True)
            read_only = bool(m.get("readOnly")) or self._volume_is_read_only(m["name"])
            mounts.append((src, m["mountPath"], read_only))
        term_path = c.spec.get("terminationMessagePath", DEFAULT_TERMINATION_PATH)
        mounts.append((self._termination_file(c.name), term_path, False))
        host_network = bool(self._current()["spec"].get("hostNetwork"))
        if not host_network and not any(dst == "/etc/hosts" for _, dst, _ in mounts):
            mounts.append((self.hosts_path, "/etc/hosts", True))
        mounts.sort(key=lambda m: len(Path(m[1]).parts))
        for src, dst, _ in mounts:
            self.node.ensure_mount_point(Path(dst), directory=src.is_dir())
        return mounts

    def _volume_is_read_only(self, name: str) -> bool:
        for vol in self._current()["spec"].get("volumes", []):
            if vol["name"] == name:
                return any(k in vol for k in ("configMap", "secret", "projected", "downwardAPI"))
        return False

    def _container_env(self, pod: JSON, spec: JSON) -> dict[str, str]:
        env: dict[str, str] = {
            "PATH": BASE_PATH,
            "HOME": "/root",
            "HOSTNAME": pod_hostname(pod),
            "PYTHONPATH": self.node.pythonpath,
            **self.node.service_env,
        }
        for source in spec.get("envFrom", []):
            prefix = source.get("prefix", "")
            if "configMapRef" in source:
                data = self._configmap(source["configMapRef"])
            else:
                data = self._secret(source["secretRef"])
            env.update({prefix + k: v.decode(errors="replace") for k, v in data.items()})
        for var in spec.get("env", []):
            name = var["name"]
            if "valueFrom" not in var:
                env[name] = expand(var.get("value", ""), env)
                continue
            src = var["valueFrom"]
            if "fieldRef" in src:
                env[name] = field_value(pod, src["fieldRef"]["fieldPath"], self.pod_ip, self.node.host_ip)
            elif "resourceFieldRef" in src:
                env[name] = resource_value(spec, src["resourceFieldRef"], self.node.allocatable)
            elif "secretKeyRef" in src or "configMapKeyRef" in src:
                kind = "secretKeyRef" if "secretKeyRef" in src else "configMapKeyRef"
                ref = src[kind]
                data = self._secret(ref) if kind == "secretKeyRef" else self._configmap(ref)
                if ref["key"] in data:
                    env[name] = data[ref["key"]].decode(errors="replace")
                elif not ref.get("optional"):
                    what = "secret" if kind == "secretKeyRef" else "configmap"
                    raise ConfigError(
                        "CreateContainerConfigError",
                        f"couldn't find key {ref['key']} in {what} {self.ns}/{ref['name']}",
                    )
        return env

    # -- status --

    def _phase(self) -> str:
        pod = self._current()
        policy = pod["spec"].get("restartPolicy", "Always")
        if self.deadline_exceeded:
            return "Failed"
        for init in self.inits:
            if init.terminated is None or init.terminated.get("exitCode") != 0:
                failed = init.terminated is not None and (policy == "Never" or self.finished)
                return "Failed" if failed else "Pending"
        if any(c.proc is None and c.terminated is None and c.restart_count == 0 for c in self.containers):
            return "Pending"
        # Running, or waiting to be restarted after an exit.
        if any(c.running or c.terminated is None for c in self.containers):
            return "Running"
        codes = [int(c.terminated["exitCode"]) for c in self.containers if c.terminated is not None]
        final = self.finished or self._current()["metadata"].get("deletionTimestamp")
        if policy == "Always" and not final:
            return "Running"
        if any(code != 0 for code in codes):
            return "Failed" if (policy == "Never" or final) else "Running"
        return "Succeeded"

    def _condition(self, ctype: str, ok: bool, reason: str = "") -> JSON:
        status = "True" if ok else "False"
        old = self.conditions.get(ctype)
        cond: JSON = {
            "type": ctype,
            "status": status,
            "lastProbeTime": None,
            "lastTransitionTime": old["lastTransitionTime"] if old and old["status"] == status else now(),
        }
        if reason:
            cond["reason"] = reason
        self.conditions[ctype] = cond
        return cond

    def _status(self) -> JSON:
        phase = self._phase()
        terminal = phase in ("Succeeded", "Failed")
        inits_done = all(i.terminated is not None and i.terminated.get("exitCode") == 0 for i in self.inits)
        ready = not terminal and all(c.ready and c.running for c in self.containers)
        reason = (
            "PodCompleted" if phase == "Succeeded" else ("PodFailed" if terminal else "ContainersNotReady")
        )
        status: JSON = {
            "phase": phase,
            "hostIP": self.node.host_ip,
            "hostIPs": [{"ip": self.node.host_ip}],
            "podIP": self.pod_ip,
            "podIPs": [{"ip": self.pod_ip}],
            "startTime": self.start_time,
            "conditions": [
                self._condition("PodReadyToStartContainers", self.volumes_ready),
                self._condition("Initialized", inits_done, "" if inits_done else "ContainersNotInitialized"),
                self._condition("ContainersReady", ready, "" if ready else reason),
                self._condition("Ready", ready, "" if ready else reason),
            ],
            "containerStatuses": [c.status(self._image_id(c)) for c in self.containers],
        }
        if self.inits:
            status["initContainerStatuses"] = [c.status(self._image_id(c)) for c in self.inits]
        if self.deadline_exceeded:
            status["reason"] = "DeadlineExceeded"
            status["message"] = "Pod was active on the node longer than the specified deadline"
        return status

    def _image_id(self, c: ContainerRun) -> str:
        return f"local://{c.spec.get('image', '')}"

    def _post_status(self, final: bool = False) -> None:
        status = self._status()
        if status == self.last_posted and not final:
            return
        try:
            self.client.patch(
                f"/api/v1/namespaces/{self.ns}/pods/{self.pod_name}/status",
                {"metadata": {"uid": self.uid}, "status": status},
                STRATEGIC_MERGE_PATCH,
            )
            self.last_posted = status
        except ApiError as e:
            if e.status in (404, 409):
                if e.status == 404:
                    self.gone = True
                return
            log.warning("status update for %s/%s failed: %s", self.ns, self.pod_name, e)

    def _finalize_delete(self) -> None:
        for staged in self.node.stage_root.glob(f"{self.uid}-*"):
            shutil.rmtree(staged, ignore_errors=True)
        try:
            self.client.delete(
                f"/api/v1/namespaces/{self.ns}/pods/{self.pod_name}",
                {"gracePeriodSeconds": 0, "preconditions": {"uid": self.uid}},
            )
        except ApiError as e:
            if e.status not in (404, 409):
                log.warning("final delete of %s/%s failed: %s", self.ns, self.pod_name, e)


def _killpg(proc: subprocess.Popen[bytes] | None, sig: signal.Signals) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


@dataclass
class NodeContext:
    """What every pod worker on this node shares."""

    name: str
    pods_dir: Path
    images: ImageMap
    pythonpath: str
    service_env: dict[str, str]
    allocatable: dict[str, str]
    host_ip: str = "127.0.0.1"
    # Host paths every container needs (the checkout, the Python environment), re-bound where a volume
    # hides them.
    keep_paths: list[Path] = field(default_factory=list)
    # Where mount sources are staged; outside any path a pod would mount over.
    stage_root: Path = Path("/run/kubetune-agent")
    mount_lock: threading.Lock = field(default_factory=threading.Lock)

    def ensure_mount_point(self, path: Path, *, directory: bool) -> None:
        """Create an empty directory or file on the host where a volume is bind-mounted, if none is there."""
        with self.mount_lock:
            if path.exists() or path.is_symlink():
                return
            if directory:
                path.mkdir(parents=True, exist_ok=True)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()

"""`kubectl finetune` against the real local API server, with jobs the operator really ran: the trainer pod
trained on the node agent, the operator scraped it and wrote status.history. The plugin is found by the
real kubectl on PATH, exactly as a user's kubectl finds it."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from e2e.cluster.cluster import ClusterInfo
from e2e.cluster.kube import ApiError, KubeClient
from e2e.cluster.procs import bin_dir
from e2e.cluster.s3 import S3Server, upload_directory
from e2e.demo import CHART, instruction_dataset, plugin_env, to_jsonl
from e2e.tests.helpers import (
    ON_AGENT,
    ON_KWOK,
    condition,
    ftj_path,
    has_condition,
    make_ftj,
    pods_of,
    s3_secret,
)
from kubetune_cli import plot

JSON = dict[str, Any]
STEPS = 400
EVAL_EVERY = 50
MODELS, DATASETS, ADAPTERS = "plugin-models", "plugin-datasets", "plugin-adapters"


class Plugin:
    """Runs `kubectl finetune ...` through the built kubectl, with the cluster's kubeconfig."""

    def __init__(self, cluster: ClusterInfo, namespace: str) -> None:
        assert (bin_dir() / "kubectl").exists(), (
            "kubectl is not built: run `bash e2e/cluster/build.sh kubectl`"
        )
        self.env = plugin_env(cluster.kubeconfig)
        self.kubeconfig = cluster.kubeconfig
        self.namespace = namespace

    def __call__(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["kubectl", "finetune", *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def ok(self, *args: str) -> str:
        done = self(*args)
        assert done.returncode == 0, (args, done.returncode, done.stdout, done.stderr)
        return done.stdout


@pytest.fixture(scope="module")
def plugin(cluster: ClusterInfo, operator: Any) -> Plugin:
    return Plugin(cluster, operator.namespace)


@pytest.fixture(scope="module")
def inputs(
    s3: S3Server, tmp_path_factory: pytest.TempPathFactory, kube: KubeClient, operator: Any
) -> S3Server:
    from kubetune_devtools.tiny import save_tiny_model

    client = s3.client()
    for bucket in (MODELS, DATASETS, ADAPTERS):
        client.create_bucket(Bucket=bucket)
    upload_directory(client, save_tiny_model(tmp_path_factory.mktemp("tiny-model")), MODELS, "tiny/")
    client.put_object(Bucket=DATASETS, Key="chat/train.jsonl", Body=to_jsonl(instruction_dataset(96)))
    client.put_object(Bucket=DATASETS, Key="chat/val.jsonl", Body=to_jsonl(instruction_dataset(16, 5000)))
    kube.apply_yaml(
        f"/api/v1/namespaces/{operator.namespace}/secrets",
        s3_secret(s3.access_key, s3.secret_key, "s3-plugin"),
    )
    return s3


def training_job(name: str, s3: S3Server, *, train: str = f"s3://{DATASETS}/chat/train.jsonl") -> JSON:
    manifest = make_ftj(
        name,
        placement=ON_AGENT,
        s3_endpoint=s3.endpoint,
        base_model=f"s3://{MODELS}/tiny/",
        output=f"s3://{ADAPTERS}/{name}/",
        backoff_limit=0,
        hyperparameters={
            "maxSteps": STEPS,
            "learningRate": 0.003,
            "microBatchSize": 4,
            "gradientAccumulation": 1,
            "evalEverySteps": EVAL_EVERY,
            "seed": 3,
        },
        extra_spec={
            "dataset": {"train": train, "validation": f"s3://{DATASETS}/chat/val.jsonl", "maxSeqLength": 96}
        },
    )
    manifest["spec"]["s3"]["credentialsSecretRef"]["name"] = "s3-plugin"
    return manifest


def finished(obj: JSON) -> bool:
    return (obj.get("status") or {}).get("phase") in ("Succeeded", "Failed")


@dataclass
class Trained:
    job: JSON
    trainer_metrics: str
    """/metrics of the trainer pod, scraped while it ran."""


@pytest.fixture(scope="module")
def trained(kube: KubeClient, operator: Any, inputs: S3Server) -> Trained:
    """A LoRA job the operator ran to Succeeded, with eval points in its history; on the way, one scrape of
    the running trainer pod's metrics."""
    ns = operator.namespace
    kube.create(ftj_path(ns), training_job("plugin-lora", inputs))
    path = ftj_path(ns, "plugin-lora")
    scraped = ""
    deadline = time.monotonic() + 420
    while not finished(job := kube.get(path)):
        assert time.monotonic() < deadline, f"plugin-lora did not finish in 420 s: {job.get('status')}"
        if not scraped:
            scraped = scrape_trainer(kube, ns, "plugin-lora")
        time.sleep(0.3)
    assert job["status"]["phase"] == "Succeeded", (condition(job, "Failed"), operator.log_tail())
    return Trained(job, scraped)


def scrape_trainer(kube: KubeClient, namespace: str, name: str) -> str:
    for pod in pods_of(kube, namespace, f"kubetune.io/job-name={name}"):
        ip = (pod.get("status") or {}).get("podIP")
        ports = [
            p for c in pod["spec"]["containers"] for p in c.get("ports", []) if p.get("name") == "metrics"
        ]
        if pod["status"].get("phase") != "Running" or not ip or not ports:
            continue
        try:
            response = requests.get(f"http://{ip}:{ports[0]['containerPort']}/metrics", timeout=2)
        except requests.RequestException:
            continue
        if response.ok and "kubetune_trainer_step" in response.text:
            return response.text
    return ""


def test_the_operator_wrote_a_bounded_history_the_api_server_accepted(trained: Trained) -> None:
    history = trained.job["status"]["history"]
    assert len(history["step"]) == len(history["trainLoss"]) == len(history["learningRate"]) >= 3
    assert history["step"][-1] == STEPS == trained.job["status"]["progress"]["step"]
    assert history["step"] == sorted(set(history["step"]))
    assert len(history["evalStep"]) == len(history["evalLoss"]) >= 2
    # The newest point is the mean over its bucket's samples, the final one included: exactly the final loss
    # only when the bucket holds one step; otherwise close to it (neighbouring steps' losses differ by ~1%).
    final = trained.job["status"]["metrics"]["trainLoss"]
    one_step = history["step"][-1] - history["step"][-2] == 1
    assert history["trainLoss"][-1] == pytest.approx(final, rel=1e-4 if one_step else 0.1)


def test_list_shows_phase_method_model_progress_and_loss(plugin: Plugin, trained: Trained) -> None:
    out = plugin.ok("list", "-n", plugin.namespace)
    header, *rows = out.splitlines()
    assert header.split() == ["NAME", "PHASE", "METHOD", "MODEL", "PROGRESS", "ETA", "LOSS", "AGE"]
    row = next(r.split() for r in rows if r.startswith("plugin-lora "))
    loss = trained.job["status"]["metrics"]["trainLoss"]
    assert row[:7] == ["plugin-lora", "Succeeded", "LoRA", "tiny", f"{STEPS}/{STEPS}", "100%", "-"]
    assert row[7] == f"{loss:.4g}"
    everywhere = plugin.ok("list", "-A", "--kubeconfig", plugin.kubeconfig)
    assert everywhere.splitlines()[0].split()[0] == "NAMESPACE"
    assert any(line.split()[:2] == [plugin.namespace, "plugin-lora"] for line in everywhere.splitlines())


def tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], check=True, capture_output=True, text=True, timeout=30).stdout


@pytest.fixture
def tmux_server() -> Iterator[str]:
    if shutil.which("tmux") is None:
        pytest.fail("tmux is not installed; install it (Debian: apt-get install -y tmux) to run this test")
    socket = f"kubetune-{uuid.uuid4().hex[:8]}"
    yield socket
    subprocess.run(["tmux", "-L", socket, "kill-server"], capture_output=True, timeout=30)


def test_describe_draws_the_loss_chart_in_a_real_terminal(
    plugin: Plugin, trained: Trained, tmux_server: str
) -> None:
    # The pane's shell may be a login shell that resets PATH: set the plugin's environment in the command.
    environment = " ".join(f"{key}={shlex.quote(plugin.env[key])}" for key in ("PATH", "KUBECONFIG"))
    command = (
        f"env {environment} kubectl finetune describe plugin-lora -n {plugin.namespace}; "
        "echo DESCRIBE-EXIT=$?; sleep 600"
    )
    tmux("-L", tmux_server, "new-session", "-d", "-x", "110", "-y", "70", command)
    deadline = time.monotonic() + 60
    screen = ""
    while "DESCRIBE-EXIT=" not in screen and time.monotonic() < deadline:
        time.sleep(0.3)
        screen = tmux("-L", tmux_server, "capture-pane", "-p", "-J")
    assert "DESCRIBE-EXIT=0" in screen, screen
    lines = screen.splitlines()
    assert "Succeeded" in screen and trained.job["status"]["adapter"]["sha256"] in screen
    chart_top = lines.index("Loss history:") + 1
    legend = next(i for i, line in enumerate(lines) if "* train loss" in line and "o eval loss" in line)
    plot_area = lines[chart_top : legend - 2]
    assert len(plot_area) == 12
    # The train line covers its share of the step axis (the axis runs from the first point of either curve to
    # the last), less a column or two where an eval mark sits on it.
    history = trained.job["status"]["history"]
    x_lo, x_hi = (
        min(history["step"][0], history["evalStep"][0]),
        max(history["step"][-1], history["evalStep"][-1]),
    )
    share = (history["step"][-1] - history["step"][0]) / (x_hi - x_lo)
    columns = {col for line in plot_area for col, ch in enumerate(line) if ch == "*"}
    rows_with_train = [row for row, line in enumerate(plot_area) if "*" in line]
    first, last = min(columns), max(columns)
    plot_width = len(lines[legend - 2].strip()) - 1  # the x axis: "+-----..."
    assert last - first >= share * (plot_width - 1) - 3, "\n".join(plot_area)
    assert sum(ch == "o" for line in plot_area for ch in line) >= 2
    # Drawn from the data: the highest and lowest train glyphs sit on the rows of the largest and smallest
    # train loss, on a y axis spanning both curves.
    values = history["trainLoss"] + history["evalLoss"]
    y_lo, y_hi = min(values), max(values)

    assert y_hi > y_lo, values

    def row_of(y: float) -> int:
        return round((y_hi - y) / (y_hi - y_lo) * (len(plot_area) - 1))

    assert abs(min(rows_with_train) - row_of(max(history["trainLoss"]))) <= 1, "\n".join(plot_area)
    assert abs(max(rows_with_train) - row_of(min(history["trainLoss"]))) <= 1, "\n".join(plot_area)
    # A terminal: the lines are coloured (train blue, eval red).
    coloured = tmux("-L", tmux_server, "capture-pane", "-p", "-e")
    assert "\x1b[34m*" in coloured and "\x1b[31mo" in coloured


def colour_pixels(png: Path, hex_colour: str) -> int:
    from matplotlib import image

    pixels = image.imread(png)[:, :, :3]
    target = [int(hex_colour[i : i + 2], 16) / 255 for i in (1, 3, 5)]
    return int((abs(pixels - target).max(axis=2) < 0.03).sum())


def test_plot_writes_a_png_with_both_curves(plugin: Plugin, trained: Trained, tmp_path: Path) -> None:
    png = tmp_path / "run.png"
    out = plugin.ok("plot", "plugin-lora", "-n", plugin.namespace, "-o", str(png))
    assert str(png) in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Lines are 2.5 px wide over hundreds of pixels: each curve leaves far more than a legend swatch.
    assert colour_pixels(png, plot.TRAIN_COLOR) > 400
    assert colour_pixels(png, plot.EVAL_COLOR) > 300
    assert colour_pixels(png, plot.LEARNING_RATE_COLOR) > 50


def test_logs_read_the_node_agents_file_and_filter_by_rank(plugin: Plugin, trained: Trained) -> None:
    out = plugin.ok("logs", "plugin-lora", "-n", plugin.namespace)
    assert f"sha256 {trained.job['status']['adapter']['sha256']}" in out
    assert '"event": "progress"' in out and '"event": "eval"' in out
    followed = plugin.ok("logs", "plugin-lora", "-n", plugin.namespace, "-f")  # ends: the pod has ended
    assert followed == out
    rank0 = plugin.ok("logs", "plugin-lora", "-n", plugin.namespace, "--rank", "0")
    rank1 = plugin.ok("logs", "plugin-lora", "-n", plugin.namespace, "--rank", "1")
    assert '"event": "progress"' in rank0 and '"event"' not in rank1


def test_wait_exits_0_on_success_and_1_with_the_reason_on_failure(
    plugin: Plugin, trained: Trained, kube: KubeClient, operator: Any, inputs: S3Server
) -> None:
    done = plugin("wait", "plugin-lora", "-n", plugin.namespace, "--timeout", "30s")
    assert done.returncode == 0 and "succeeded" in done.stdout, done
    kube.create(
        ftj_path(operator.namespace),
        training_job("plugin-broken", inputs, train=f"s3://{DATASETS}/chat/nope.jsonl"),
    )
    done = plugin("wait", "plugin-broken", "-n", plugin.namespace, "--timeout", "300s", timeout=330)
    failed = condition(kube.get(ftj_path(operator.namespace, "plugin-broken")), "Failed")
    assert failed is not None and failed["status"] == "True"
    assert done.returncode == 1, done
    assert f"failed ({failed['reason']})" in done.stdout
    missing = plugin("wait", "no-such-job", "-n", plugin.namespace)
    assert missing.returncode == 2 and "NotFound" in missing.stderr


def test_suspend_resume_and_cancel(plugin: Plugin, trained: Trained, kube: KubeClient, operator: Any) -> None:
    ns = operator.namespace
    kube.create(ftj_path(ns), make_ftj("plugin-steer", placement=ON_KWOK))
    path = ftj_path(ns, "plugin-steer")
    kube.wait_for(
        path, lambda o: has_condition(o, "Running") or has_condition(o, "Running", "False"), timeout=60
    )

    plugin.ok("suspend", "plugin-steer", "-n", ns)
    suspended = kube.wait_for(
        path, lambda o: has_condition(o, "Suspended"), timeout=60, what="Suspended=True"
    )
    assert suspended["spec"]["suspend"] is True
    assert condition(suspended, "Suspended")["reason"] == "Suspended"

    plugin.ok("resume", "plugin-steer", "-n", ns)
    resumed = kube.wait_for(
        path, lambda o: has_condition(o, "Suspended", "False"), timeout=60, what="Suspended=False"
    )
    assert resumed["spec"]["suspend"] is False
    assert condition(resumed, "Suspended")["reason"] == "Resumed"

    refused = plugin("suspend", "plugin-lora", "-n", ns)
    assert refused.returncode == 1 and "already succeeded" in refused.stderr

    out = plugin.ok("cancel", "plugin-steer", "-n", ns)
    assert "s3://adapters/plugin-steer/" in out

    def gone(_: JSON) -> bool:
        try:
            kube.get(path)
        except ApiError as exc:
            return exc.status == 404
        return False

    kube.wait_for(f"/api/v1/namespaces/{ns}", gone, timeout=60, what="plugin-steer to be deleted")


def test_every_dashboard_query_names_a_metric_the_running_trainer_or_the_operator_exports(
    trained: Trained, operator: Any
) -> None:
    dashboard = json.loads((CHART / "files" / "dashboard.json").read_text())
    loss_panel = next(p for p in dashboard["panels"] if p["title"] == "Loss curves")
    assert [re.findall(r"kubetune_\w+", t["expr"])[0] for t in loss_panel["targets"]] == [
        "kubetune_trainer_train_loss",
        "kubetune_trainer_eval_loss",
        "kubetune_trainer_learning_rate",
    ]
    queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    queries += [
        v["query"]["query"] for v in dashboard["templating"]["list"] if isinstance(v.get("query"), dict)
    ]
    # A histogram is queried through its _bucket series; the exposition names them all.
    used = {name for q in queries for name in re.findall(r"\bkubetune_\w+", q)}
    assert trained.trainer_metrics, "the trainer pod was never scraped while it ran"
    operator_metrics = requests.get(f"http://127.0.0.1:{operator.metrics_port}/metrics", timeout=5).text
    # Names of the samples served, and of the families declared (a per-job family with no job in it yet
    # has only its # TYPE line).
    exported = {
        line.removeprefix("# TYPE ").split("{")[0].split(" ")[0]
        for text in (trained.trainer_metrics, operator_metrics)
        for line in text.splitlines()
        if line and (not line.startswith("#") or line.startswith("# TYPE "))
    }
    missing = sorted(used - exported)
    assert not missing, f"dashboard queries name series no live scrape served: {missing}"

"""`make demo`: fine-tune a tiny model end to end, the way a user would, and show the result.

    python -m e2e.demo [--keep] [--steps N]

1. Cluster: the one $KUBECONFIG (or ~/.kube/config) points at when it answers; otherwise a local control plane
   (etcd, kube-apiserver, controller manager, scheduler and a node agent that runs pods as local processes)
   booted from ~/.cache/kubetune, plus a local S3 server (versitygw).
2. `helm upgrade --install` the chart from charts/kubetune; the operator runs from it, under its own
   service account.
3. Upload a tiny Llama-shaped base model and a small instruction dataset to S3; create the credentials Secret.
4. Apply a LoRA FineTuneJob and follow it like `kubectl get ftj -w` (step, loss, tokens/s).
5. Print the adapter URI and its sha256 (checked against the object in S3) and the loss curve, as a PNG and a
   terminal sparkline.
6. Show the job the way a user would look at it afterwards: `kubectl finetune describe` (plugins/).

A local cluster the demo booted is torn down at the end unless --keep; a cluster that was already there is
left as it was (the demo namespace and the release stay, and the demo says how to remove them).
On a configured cluster the S3 store must be reachable from this machine and from the pods: pass
--s3-endpoint and export AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
CHART = REPO_ROOT / "charts" / "kubetune"
OUT_DIR = REPO_ROOT / "out"
PLUGIN_DIR = REPO_ROOT / "plugins"
GROUP, VERSION, PLURAL = "kubetune.io", "v1alpha1", "finetunejobs"
RELEASE = "kubetune"
# The release name contains the chart name, so the chart names its resources after the release alone.
OPERATOR_DEPLOYMENT = RELEASE
OPERATOR_NAMESPACE = "kubetune-system"
DEMO_NAMESPACE = "kubetune-demo"
JOB_NAME = "demo-lora"
BUCKET = "kubetune-demo"
SECRET = "demo-s3-creds"
HEARTBEAT_SECONDS = 8.0
STARTED = time.monotonic()


class DemoError(RuntimeError):
    """A failure the demo explains itself; main() prints it without a traceback."""


# ---- output ---------------------------------------------------------------------------------------------


def say(message: str) -> None:
    print(f"[demo {time.monotonic() - STARTED:6.1f}s] {message}", flush=True)


@contextlib.contextmanager
def step(title: str) -> Iterator[None]:
    """Announce a step, and keep saying it is still going while it runs (never silent for long)."""
    say(f"{title} ...")
    began = time.monotonic()
    done = threading.Event()

    def heartbeat() -> None:
        while not done.wait(HEARTBEAT_SECONDS):
            say(f"  still {title.lower()} ({time.monotonic() - began:.0f}s)")

    thread = threading.Thread(target=heartbeat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
    say(f"{title}: done in {time.monotonic() - began:.1f}s")


SPARK_BARS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float], width: int = 60) -> str:
    """A one-line chart of ``values`` (resampled to at most ``width`` points)."""
    if not values:
        return ""
    if len(values) > width:
        values = [values[int(i * len(values) / width)] for i in range(width)]
    low, high = min(values), max(values)
    span = high - low or 1.0
    return "".join(
        SPARK_BARS[min(len(SPARK_BARS) - 1, int((v - low) / span * len(SPARK_BARS)))] for v in values
    )


def plot_loss(points: list[tuple[int, float]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    axes.plot([s for s, _ in points], [v for _, v in points], label="train loss")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss")
    axes.set_title(f"kubetune demo: {JOB_NAME}")
    axes.grid(alpha=0.3)
    axes.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path


# ---- the dataset ----------------------------------------------------------------------------------------

_COLOURS = {
    "sky": "blue",
    "grass": "green",
    "snow": "white",
    "coal": "black",
    "sun": "yellow",
    "blood": "red",
}
_PLURALS = {"cat": "cats", "dog": "dogs", "tree": "trees", "city": "cities", "bird": "birds", "fish": "fish"}


def instruction_dataset(rows: int, offset: int = 0) -> list[dict[str, Any]]:
    """Chat examples with short, learnable answers (arithmetic, colours, plurals), deterministic."""
    examples = []
    colour_items, plural_items = list(_COLOURS.items()), list(_PLURALS.items())
    for i in range(offset, offset + rows):
        kind = i % 3
        if kind == 0:
            a, b = i % 23, (i * 7) % 19
            question, answer = f"What is {a} plus {b}?", f"{a} plus {b} equals {a + b}."
        elif kind == 1:
            thing, colour = colour_items[i % len(colour_items)]
            question, answer = f"What color is the {thing}?", f"The {thing} is {colour}."
        else:
            word, plural = plural_items[i % len(plural_items)]
            question, answer = f"What is the plural of {word}?", f"The plural of {word} is {plural}."
        examples.append(
            {
                "messages": [
                    {"role": "system", "content": "You answer in one short sentence."},
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": answer},
                ]
            }
        )
    return examples


# Preference pairs with a learnable rule: the chosen answer names a thing of the kind the prompt asks for,
# the rejected one a thing of another kind.
PREFERENCE_KINDS = {
    "number": ["one", "two", "three", "four", "five"],
    "color": ["red", "green", "blue", "yellow", "black"],
    "animal": ["cat", "dog", "bird", "fish"],
    "place": ["river", "mountain", "city", "country"],
}


def preference_dataset(seed: int = 11) -> list[dict[str, str]]:
    """All 242 (prompt, chosen, rejected) pairs of the rule above, shuffled by ``seed``: slices of it share
    no pair."""
    import random

    triples = [
        (kind, good, bad)
        for kind, words in PREFERENCE_KINDS.items()
        for good in words
        for other, wrong in PREFERENCE_KINDS.items()
        if other != kind
        for bad in wrong
    ]
    random.Random(seed).shuffle(triples)
    return [
        {"prompt": f"Name a {kind}:", "chosen": f" {good}", "rejected": f" {bad}"}
        for kind, good, bad in triples
    ]


def to_jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


# ---- the cluster ----------------------------------------------------------------------------------------


@dataclass
class Environment:
    kubeconfig: str
    s3_endpoint: str
    s3_access_key: str
    s3_secret_key: str
    local: bool
    cleanups: list[Callable[[], None]] = field(default_factory=list)
    keep_notes: list[str] = field(default_factory=list)


def configured_kubeconfig() -> str | None:
    """The kubeconfig a user's kubectl would use, if the cluster behind it answers within a few seconds.
    A kubeconfig of a local kubetune cluster does not count: the demo manages those itself."""
    from e2e.cluster.cluster import CLUSTERS

    path = os.environ.get("KUBECONFIG", "").split(os.pathsep)[0] or str(Path.home() / ".kube" / "config")
    if not Path(path).exists() or Path(path).resolve().is_relative_to(CLUSTERS.resolve()):
        return None
    from kubernetes import client, config

    try:
        api_client = config.new_client_from_config(config_file=path)
        api_client.configuration.retries = 0
        client.VersionApi(api_client).get_code(_request_timeout=5)
    except Exception as error:  # any failure means "no usable cluster here"; say why and boot a local one
        say(f"the cluster in {path} does not answer ({type(error).__name__}); booting a local one instead")
        return None
    return path


def local_environment(keep: bool) -> Environment:
    """The local demo cluster and its S3 server: reused when a `--keep` run left them up, else started."""
    from e2e.cluster.cluster import Cluster
    from e2e.cluster.procs import ProcessRecord, is_alive
    from e2e.cluster.s3 import S3Server

    cluster = Cluster("demo")
    was_up = cluster.is_up()
    with step("Booting the local control plane (etcd, kube-apiserver, scheduler, node agent)"):
        info = cluster.up(kwok_nodes=0, agent_nodes=1, log=lambda m: say(f"  {m}"))
    say(f"  Kubernetes {info.kubernetes_version} at {info.server}")
    s3_dir, s3_state = Path(info.dir) / "s3", Path(info.dir) / "s3.json"
    s3 = S3Server(data_dir=s3_dir)
    kept = json.loads(s3_state.read_text()) if was_up and s3_state.exists() else None
    if kept and is_alive(ProcessRecord(**kept["process"])):
        s3.port, s3_pid = int(kept["port"]), int(kept["process"]["pid"])
        say(f"  reusing the S3 server a --keep run left at {s3.endpoint}")
    else:
        with step("Starting the local S3 server (versitygw)"):
            s3.start()
        assert s3.process is not None
        s3_pid = s3.process.pid
        record = ProcessRecord(name="versitygw", pid=s3_pid, exe=str(S3Server.binary()), log=str(s3.log_path))
        s3_state.write_text(json.dumps({"port": s3.port, "process": dataclasses.asdict(record)}))
    say(f"  S3 at {s3.endpoint} (data in {s3_dir})")
    env = Environment(info.kubeconfig, s3.endpoint, s3.access_key, s3.secret_key, local=True)
    if keep or was_up:
        env.keep_notes += [
            f"export KUBECONFIG={info.kubeconfig}",
            f"kubectl -n {DEMO_NAMESPACE} get ftj -o wide",
            f"S3: {s3.endpoint}, access key {s3.access_key}, secret {s3.secret_key} (bucket {BUCKET})",
            f"kill {s3_pid}; python -m e2e.cluster down --name demo    # stop the S3 server and the cluster",
        ]
        return env
    env.cleanups += [s3.stop, lambda: cluster.down(log=lambda m: say(f"  {m}")), lambda: s3_state.unlink()]
    return env


def configured_environment(kubeconfig: str, s3_endpoint: str | None) -> Environment:
    access, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if not s3_endpoint or not access or not secret:
        raise DemoError(
            f"using the cluster in {kubeconfig}, which needs an S3 store reachable from this machine and "
            "from its pods: pass --s3-endpoint URL and export AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(or run with --local to boot a local control plane instead)"
        )
    env = Environment(kubeconfig, s3_endpoint, access, secret, local=False)
    env.keep_notes += [
        f"helm -n {OPERATOR_NAMESPACE} uninstall {RELEASE}   # remove the operator (the CRD stays)",
        f"kubectl delete namespace {DEMO_NAMESPACE}          # remove the demo job and its Secret",
    ]
    return env


# ---- steps ----------------------------------------------------------------------------------------------


def helm_binary() -> str:
    from e2e.cluster.cluster import bin_dir

    built = bin_dir() / "helm"
    if built.exists():
        return str(built)
    raise DemoError(f"helm is not built: run `bash e2e/cluster/build.sh helm` (expected {built})")


def install_chart(env: Environment, operator_image: str | None, trainer_image: str | None) -> None:
    values = [
        "--set",
        "scrapeIntervalSeconds=1",
        "--set",
        f"trainer.defaultS3Endpoint={env.s3_endpoint}",
    ]
    if operator_image:
        repository, _, tag = operator_image.rpartition(":")
        values += ["--set", f"image.repository={repository}", "--set", f"image.tag={tag}"]
    if trainer_image:
        values += ["--set", f"trainer.image={trainer_image}"]
    command = [
        helm_binary(),
        "upgrade",
        "--install",
        RELEASE,
        str(CHART),
        "--namespace",
        OPERATOR_NAMESPACE,
        "--create-namespace",
        "--kubeconfig",
        env.kubeconfig,
        *values,
    ]
    with step(
        f"Installing the chart (helm upgrade --install {RELEASE} charts/kubetune -n {OPERATOR_NAMESPACE})"
    ):
        result = subprocess.run(command, capture_output=True, text=True, timeout=180)
        if result.returncode != 0:
            raise DemoError(f"helm install failed:\n{result.stderr.strip()}")


def wait_for_operator(api: Any, timeout: float = 120.0) -> None:
    from kubernetes import client

    apps = client.AppsV1Api(api)
    with step("Waiting for the operator pod to be Ready"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            deployment = apps.read_namespaced_deployment(OPERATOR_DEPLOYMENT, OPERATOR_NAMESPACE)
            status = deployment.status
            if (
                status.ready_replicas or 0
            ) >= 1 and status.observed_generation == deployment.metadata.generation:
                return
            time.sleep(1)
        pods = client.CoreV1Api(api).list_namespaced_pod(OPERATOR_NAMESPACE).items
        detail = "; ".join(f"{p.metadata.name}: {p.status.phase}" for p in pods) or "no pods"
        raise DemoError(f"the operator did not become Ready within {timeout:.0f}s ({detail})")


def s3_client(env: Environment) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=env.s3_endpoint,
        aws_access_key_id=env.s3_access_key,
        aws_secret_access_key=env.s3_secret_key,
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}),
    )


def upload_inputs(s3: Any, run_id: str) -> dict[str, str]:
    """Upload the base model and the dataset; returns the URIs the FineTuneJob names."""
    from e2e.cluster.s3 import upload_directory
    from kubetune_devtools.tiny import save_tiny_model

    with step(f"Uploading a tiny base model and an instruction dataset to s3://{BUCKET}/"):
        with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou, s3.exceptions.BucketAlreadyExists):
            s3.create_bucket(Bucket=BUCKET)
        with tempfile.TemporaryDirectory(prefix="kubetune-demo-model-") as tmp:
            files = upload_directory(s3, save_tiny_model(Path(tmp) / "tiny", seed=0), BUCKET, "models/tiny/")
        say(f"  s3://{BUCKET}/models/tiny/: {', '.join(files)}")
        train, validation = instruction_dataset(240), instruction_dataset(24, offset=10_000)
        s3.put_object(Bucket=BUCKET, Key="datasets/demo/train.jsonl", Body=to_jsonl(train))
        s3.put_object(Bucket=BUCKET, Key="datasets/demo/validation.jsonl", Body=to_jsonl(validation))
        say(
            f"  s3://{BUCKET}/datasets/demo/: train.jsonl ({len(train)} chats), "
            f"validation.jsonl ({len(validation)} chats)"
        )
    return {
        "model": f"s3://{BUCKET}/models/tiny/",
        "train": f"s3://{BUCKET}/datasets/demo/train.jsonl",
        "validation": f"s3://{BUCKET}/datasets/demo/validation.jsonl",
        "output": f"s3://{BUCKET}/adapters/{run_id}/",
    }


def finetunejob(uris: dict[str, str], s3_endpoint: str, steps: int) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuneJob",
        "metadata": {"name": JOB_NAME, "namespace": DEMO_NAMESPACE},
        "spec": {
            "baseModel": {"uri": uris["model"]},
            "dataset": {
                "train": uris["train"],
                "validation": uris["validation"],
                "format": "Auto",
                "maxSeqLength": 128,
            },
            "method": "LoRA",
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
            "hyperparameters": {
                "maxSteps": steps,
                "learningRate": 0.003,
                "batchTokens": 1024,
                "warmupRatio": 0.05,
                "evalEverySteps": max(1, steps // 5),
                "seed": 7,
            },
            "output": {"uri": uris["output"]},
            "s3": {"endpoint": s3_endpoint, "forcePathStyle": True, "credentialsSecretRef": {"name": SECRET}},
            "resources": {"gpus": 0, "cpu": "1", "memory": "2Gi"},
            "checkpointing": {"everySteps": max(1, steps // 2), "keep": 1},
            "backoffLimit": 1,
        },
    }


def prepare_namespace(api: Any, env: Environment) -> None:
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    namespace = client.V1Namespace(
        metadata=client.V1ObjectMeta(
            name=DEMO_NAMESPACE, labels={"pod-security.kubernetes.io/enforce": "restricted"}
        )
    )
    with contextlib.suppress(ApiException):
        core.create_namespace(namespace)
    secret = client.V1Secret(
        metadata=client.V1ObjectMeta(name=SECRET),
        string_data={"AWS_ACCESS_KEY_ID": env.s3_access_key, "AWS_SECRET_ACCESS_KEY": env.s3_secret_key},
    )
    try:
        core.create_namespaced_secret(DEMO_NAMESPACE, secret)
    except ApiException as error:
        if error.status != 409:
            raise
        core.replace_namespaced_secret(SECRET, DEMO_NAMESPACE, secret)
    # A finished FineTuneJob never trains again, so a re-run replaces the previous run's job.
    try:
        custom.delete_namespaced_custom_object(
            GROUP, VERSION, DEMO_NAMESPACE, PLURAL, JOB_NAME, propagation_policy="Foreground"
        )
    except ApiException as error:
        if error.status != 404:
            raise
        return
    with step(f"Removing the previous run's FineTuneJob {JOB_NAME}"):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                custom.get_namespaced_custom_object(GROUP, VERSION, DEMO_NAMESPACE, PLURAL, JOB_NAME)
            except ApiException as error:
                if error.status == 404:
                    return
                raise
            time.sleep(0.5)
        raise DemoError(f"the previous FineTuneJob {DEMO_NAMESPACE}/{JOB_NAME} was not deleted within 60s")


@dataclass
class Follow:
    """What following the job collected: the final object and the (step, loss) points seen on the way."""

    job: dict[str, Any]
    train_points: list[tuple[int, float]]


def watch_line(job: dict[str, Any]) -> str:
    status = job.get("status") or {}
    progress, metrics = status.get("progress") or {}, status.get("metrics") or {}
    # Before the first optimizer step the trainer reports zeros; show them as "not yet".
    stepping = bool(progress.get("step"))
    step_text = f"{progress['step']}/{progress.get('totalSteps') or '?'}" if stepping else "-"
    loss = f"{metrics['trainLoss']:.4f}" if stepping and metrics.get("trainLoss") is not None else "-"
    tps = f"{progress['tokensPerSecond']:.0f}" if stepping and progress.get("tokensPerSecond") else "-"
    return (
        f"{job['metadata']['name']:<12} {status.get('phase', 'Pending'):<10} {step_text:>9} "
        f"{loss:>8} {tps:>9}  {status.get('message', '')}"
    )


def follow(api: Any, timeout: float) -> Follow:
    from kubernetes import client

    custom = client.CustomObjectsApi(api)
    print(f"{'NAME':<12} {'PHASE':<10} {'STEP':>9} {'LOSS':>8} {'TOKENS/S':>9}  MESSAGE", flush=True)
    last_line, last_print = "", time.monotonic()
    points: list[tuple[int, float]] = []
    deadline = time.monotonic() + timeout
    while True:
        job = custom.get_namespaced_custom_object(GROUP, VERSION, DEMO_NAMESPACE, PLURAL, JOB_NAME)
        status = job.get("status") or {}
        line = watch_line(job)
        if line != last_line or time.monotonic() - last_print > HEARTBEAT_SECONDS:
            print(line, flush=True)
            last_line, last_print = line, time.monotonic()
        step_number = (status.get("progress") or {}).get("step")
        loss = (status.get("metrics") or {}).get("trainLoss")
        if step_number is not None and loss is not None and (not points or points[-1][0] != step_number):
            points.append((int(step_number), float(loss)))
        if status.get("phase") in ("Succeeded", "Failed"):
            return Follow(job, points)
        if time.monotonic() > deadline:
            raise DemoError(f"{JOB_NAME} did not finish within {timeout:.0f}s; last state: {line.strip()}")
        time.sleep(1)


def loss_history(s3: Any, output_uri: str) -> list[tuple[int, float]]:
    """The per-step training loss the trainer recorded in training_summary.json next to the adapter."""
    key = output_uri.removeprefix(f"s3://{BUCKET}/") + "training_summary.json"
    try:
        summary = json.loads(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    except Exception as error:  # the scraped status points are the fallback; say why
        say(f"  no training_summary.json next to the adapter ({type(error).__name__})")
        return []
    return [(step, float(loss)) for step, loss in enumerate(summary.get("losses") or [], start=1)]


def report(result: Follow, s3: Any) -> None:
    status = result.job.get("status") or {}
    if status.get("phase") != "Succeeded":
        failed = next((c for c in status.get("conditions", []) if c["type"] == "Failed"), {})
        raise DemoError(
            f"{JOB_NAME} failed: {failed.get('reason', '?')}: {failed.get('message', status.get('message'))}"
        )
    adapter = status.get("adapter") or {}
    key = adapter["uri"].removeprefix(f"s3://{BUCKET}/") + "adapter_model.safetensors"
    actual = hashlib.sha256(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()).hexdigest()
    check = (
        "matches the object in S3" if actual == adapter.get("sha256") else f"MISMATCH: S3 object is {actual}"
    )
    train, source = loss_history(s3, adapter["uri"]), "training_summary.json"
    if len(train) < 2:
        train, source = result.train_points, "the FineTuneJob status, as scraped"
    print(flush=True)
    print(f"adapter URI : {adapter['uri']}")
    print(f"files       : {', '.join(adapter.get('files', []))} ({adapter.get('sizeBytes', 0)} bytes)")
    print(f"sha256      : {adapter.get('sha256')} ({check})")
    metrics = status.get("metrics") or {}
    print(f"final loss  : train {metrics.get('trainLoss')}, eval {metrics.get('evalLoss')}")
    if train:
        png = plot_loss(train, OUT_DIR / "demo-loss.png")
        print(
            f"loss curve  : {sparkline([v for _, v in train])}  {train[0][1]:.3f} -> {train[-1][1]:.3f} "
            f"over {train[-1][0]} steps (from {source})"
        )
        print(f"loss plot   : {png}")
    if actual != adapter.get("sha256"):
        raise DemoError("the adapter in S3 does not match the sha256 in the FineTuneJob status")


def plugin_env(kubeconfig: str) -> dict[str, str]:
    """An environment in which `kubectl finetune` runs from this checkout: plugins/ (its launcher) and this
    Python (for the launcher's `python3`) on PATH, then a kubectl: the locally built one when there is one,
    else the user's."""
    from e2e.cluster.procs import bin_dir

    path = [str(PLUGIN_DIR), str(Path(sys.executable).parent)]
    built = bin_dir()
    if (built / "kubectl").exists():
        path.append(str(built))
    return {**os.environ, "KUBECONFIG": kubeconfig, "PATH": os.pathsep.join([*path, os.environ["PATH"]])}


def describe_with_plugin(env: Environment) -> None:
    """The job as `kubectl finetune describe` shows it: conditions, adapter and the loss chart."""
    argv = ["kubectl", "finetune", "describe", JOB_NAME, "--namespace", DEMO_NAMESPACE]
    print(f"\n$ {' '.join(argv)}", flush=True)
    try:
        done = subprocess.run(argv, env=plugin_env(env.kubeconfig), timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise DemoError(f"`{' '.join(argv)}` could not run: {error}") from error
    if done.returncode != 0:
        raise DemoError(f"`{' '.join(argv)}` exited with {done.returncode}")


def run(args: argparse.Namespace) -> None:
    from kubernetes import client, config

    kubeconfig = None if args.local else configured_kubeconfig()
    env = configured_environment(kubeconfig, args.s3_endpoint) if kubeconfig else local_environment(args.keep)
    say(f"cluster: {'local control plane' if env.local else kubeconfig}")
    try:
        api = config.new_client_from_config(config_file=env.kubeconfig)
        install_chart(env, args.operator_image, args.trainer_image)
        wait_for_operator(api)
        run_id = f"run-{time.strftime('%Y%m%d-%H%M%S')}"
        s3 = s3_client(env)
        uris = upload_inputs(s3, run_id)
        prepare_namespace(api, env)
        manifest = finetunejob(uris, env.s3_endpoint, args.steps)
        client.CustomObjectsApi(api).create_namespaced_custom_object(
            GROUP, VERSION, DEMO_NAMESPACE, PLURAL, manifest
        )
        say(
            f"applied FineTuneJob {DEMO_NAMESPACE}/{JOB_NAME} (LoRA r=8, {args.steps} steps on CPU); "
            "following it:"
        )
        result = follow(api, args.timeout)
        report(result, s3)
        describe_with_plugin(env)
    finally:
        if env.keep_notes:
            print("\nThe demo cluster is still up:" if env.local else "\nTo clean up:")
            for note in env.keep_notes:
                print(f"  {note}")
        if env.cleanups:
            with step("Tearing down the local control plane and S3 server (--keep leaves them up)"):
                for cleanup in reversed(env.cleanups):
                    cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2e.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="leave the local cluster and S3 server running")
    parser.add_argument(
        "--local", action="store_true", help="boot a local control plane even if kubectl reaches a cluster"
    )
    parser.add_argument("--steps", type=int, default=80, help="optimizer steps to train (default 80)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for the job to finish")
    parser.add_argument(
        "--s3-endpoint", help="S3 endpoint for a configured cluster (reachable from its pods)"
    )
    parser.add_argument("--operator-image", help="operator image for a configured cluster")
    parser.add_argument("--trainer-image", help="trainer image for a configured cluster")
    args = parser.parse_args(argv)
    try:
        run(args)
    except DemoError as error:
        say(f"error: {error}")
        return 1
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    say(f"finished in {time.monotonic() - STARTED:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

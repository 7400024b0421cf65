"""kubetune installed the way users install it: `helm install` of charts/kubetune on the local control plane.

The operator runs from the chart (the node agent maps its image to `python -m kubetune_operator`) with the
chart's service-account token and nothing else, so a FineTuneJob that reaches Succeeded proves the chart's
RBAC is sufficient, and SubjectAccessReviews prove it is not broader than needed. The chart runs with
watchNamespaces (namespaced Roles), so it never competes with the suite's other operator for a namespace.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e.cluster import kueue as kueue_harness
from e2e.cluster.cluster import REPO_ROOT, ClusterInfo, bin_dir
from e2e.cluster.kube import ApiError, KubeClient
from e2e.cluster.kueue import KueueProcess
from e2e.cluster.s3 import S3Server, upload_directory
from e2e.demo import instruction_dataset, to_jsonl
from e2e.tests.helpers import (
    CRD_NAME,
    ON_AGENT,
    condition,
    container_log,
    ftj_path,
    make_ftj,
    pods_of,
    s3_secret,
)

JSON = dict[str, Any]
CHART = REPO_ROOT / "charts" / "kubetune"
RELEASE = "kt"
FULLNAME = f"{RELEASE}-kubetune"
BUCKET = "helm-e2e"
OPERATOR_SELECTOR = f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component=operator"


@dataclass
class Release:
    cluster: ClusterInfo
    system_namespace: str
    namespace: str
    """The namespace the operator watches; it enforces the restricted Pod Security level."""

    def helm(self, *args: str, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(helm_binary()), *args, "--kubeconfig", self.cluster.kubeconfig],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result


def helm_binary() -> Path:
    helm = bin_dir() / "helm"
    assert helm.exists(), f"helm is not built: run `bash e2e/cluster/build.sh helm` ({helm})"
    return helm


def operator_debug(kube: KubeClient, release: Release) -> str:
    pods = pods_of(kube, release.system_namespace, OPERATOR_SELECTOR)
    logs = [
        container_log(release.cluster, release.system_namespace, p["metadata"]["name"], "operator")[-4000:]
        for p in pods
    ]
    return "\n".join(logs) or "no operator pod"


@pytest.fixture(scope="module")
def release(
    cluster: ClusterInfo, kube: KubeClient, make_namespace: Callable[..., str], s3: S3Server
) -> Iterator[Release]:
    rel = Release(
        cluster, make_namespace("kubetune-system"), make_namespace("helm-e2e", pod_security="restricted")
    )
    rel.helm(
        "upgrade",
        "--install",
        RELEASE,
        str(CHART),
        "--namespace",
        rel.system_namespace,
        "--set",
        f"watchNamespaces[0]={rel.namespace}",
        "--set",
        "scrapeIntervalSeconds=1",
        "--set",
        f"trainer.defaultS3Endpoint={s3.endpoint}",
    )
    deployment = f"/apis/apps/v1/namespaces/{rel.system_namespace}/deployments/{FULLNAME}"
    try:
        kube.wait_for(
            deployment,
            lambda d: (d.get("status") or {}).get("readyReplicas", 0) >= 1,
            timeout=120,
            what="the chart's operator Deployment to be Ready",
        )
    except TimeoutError as error:
        raise AssertionError(f"{error}\noperator log:\n{operator_debug(kube, rel)}") from error
    yield rel
    rel.helm("uninstall", RELEASE, "--namespace", rel.system_namespace, "--ignore-not-found", check=False)


@pytest.fixture(scope="module")
def inputs(s3: S3Server, tmp_path_factory: pytest.TempPathFactory) -> S3Server:
    from kubetune_devtools.tiny import save_tiny_model

    client = s3.client()
    client.create_bucket(Bucket=BUCKET)
    upload_directory(
        client, save_tiny_model(tmp_path_factory.mktemp("helm-tiny-model")), BUCKET, "models/tiny/"
    )
    client.put_object(Bucket=BUCKET, Key="datasets/chat.jsonl", Body=to_jsonl(instruction_dataset(48)))
    return s3


def tiny_job(name: str, s3: S3Server, **extra_spec: Any) -> JSON:
    manifest = make_ftj(
        name,
        gpus=0,
        placement=ON_AGENT,
        s3_endpoint=s3.endpoint,
        base_model=f"s3://{BUCKET}/models/tiny/",
        train=f"s3://{BUCKET}/datasets/chat.jsonl",
        output=f"s3://{BUCKET}/adapters/{name}/",
        hyperparameters={
            "maxSteps": 4,
            "learningRate": 0.001,
            "microBatchSize": 4,
            "gradientAccumulation": 1,
        },
        extra_spec={"backoffLimit": 0, **extra_spec},
    )
    manifest["spec"]["dataset"]["maxSeqLength"] = 128
    return manifest


@pytest.fixture(scope="module")
def trained(kube: KubeClient, release: Release, inputs: S3Server) -> JSON:
    """One FineTuneJob trained to the end by the chart's operator."""
    ns = release.namespace
    kube.apply_yaml(f"/api/v1/namespaces/{ns}/secrets", s3_secret(inputs.access_key, inputs.secret_key))
    kube.create(ftj_path(ns), tiny_job("via-helm", inputs))
    done = kube.wait_for(
        ftj_path(ns, "via-helm"),
        lambda o: (o.get("status") or {}).get("phase") in ("Succeeded", "Failed"),
        timeout=300,
        what="the FineTuneJob to finish",
    )
    if done["status"]["phase"] != "Succeeded":
        trainer_logs = "\n".join(
            container_log(release.cluster, ns, p["metadata"]["name"], "trainer")[-3000:]
            for p in pods_of(kube, ns, "kubetune.io/job-name=via-helm")
        )
        pytest.fail(
            f"FineTuneJob failed: {condition(done, 'Failed')}\ntrainer:\n{trainer_logs}\n"
            f"operator:\n{operator_debug(kube, release)}"
        )
    return done


def access(
    kube: KubeClient,
    release: Release,
    verb: str,
    resource: str,
    *,
    group: str = "",
    namespace: str | None = None,
    subresource: str = "",
    account: str = FULLNAME,
) -> bool:
    """May the chart's service account (``account``, in the release namespace) do this? Asked the API
    server's authorizer (SubjectAccessReview)."""
    sa_ns = release.system_namespace
    attributes: JSON = {"verb": verb, "group": group, "resource": resource, "subresource": subresource}
    if namespace:
        attributes["namespace"] = namespace
    review = kube.create(
        "/apis/authorization.k8s.io/v1/subjectaccessreviews",
        {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SubjectAccessReview",
            "spec": {
                "user": f"system:serviceaccount:{sa_ns}:{account}",
                "groups": [
                    "system:serviceaccounts",
                    f"system:serviceaccounts:{sa_ns}",
                    "system:authenticated",
                ],
                "resourceAttributes": attributes,
            },
        },
    )
    return bool(review["status"].get("allowed"))


def test_helm_lint_and_template_pass_for_every_ci_values_file() -> None:
    values_files = sorted((CHART / "ci").glob("*-values.yaml"))
    assert len(values_files) >= 4
    for values in values_files:
        for command in (["lint", "--strict", str(CHART)], ["template", RELEASE, str(CHART)]):
            result = subprocess.run(
                [str(helm_binary()), *command, "-f", str(values)], capture_output=True, text=True, timeout=60
            )
            assert result.returncode == 0, f"helm {command[0]} -f {values.name}:\n{result.stderr}"
        docs = [d for d in yaml.safe_load_all(result.stdout) if d]
        assert any(d["kind"] == "Deployment" for d in docs)


def test_operator_runs_from_the_chart_under_its_own_service_account(
    kube: KubeClient, release: Release
) -> None:
    (pod,) = pods_of(kube, release.system_namespace, OPERATOR_SELECTOR)
    spec = pod["spec"]
    assert spec["serviceAccountName"] == FULLNAME
    (container,) = spec["containers"]
    assert container["image"] == "kubetune/operator:0.1.0"
    assert "KUBECONFIG" not in {e["name"] for e in container.get("env", [])}
    assert not (Path.home() / ".kube" / "config").exists(), (
        "a kubeconfig on this machine would shadow the token"
    )
    projected = [v for v in spec["volumes"] if "projected" in v]
    assert any("serviceAccountToken" in s for v in projected for s in v["projected"]["sources"])
    assert pod["status"]["phase"] == "Running"
    assert any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"]["conditions"])
    assert pod["status"]["podIP"].startswith("127.")


def test_rbac_allows_what_the_operator_does_and_nothing_more(kube: KubeClient, release: Release) -> None:
    ns, other = release.namespace, release.system_namespace
    allowed = [
        ("patch", "finetunejobs", "kubetune.io", ns, ""),
        ("patch", "finetunejobs", "kubetune.io", ns, "status"),
        ("create", "jobs", "batch", ns, ""),
        ("watch", "pods", "", ns, ""),
        ("create", "events", "", ns, ""),
        ("list", "customresourcedefinitions", "apiextensions.k8s.io", None, ""),
        ("list", "workloads", "kueue.x-k8s.io", ns, ""),
    ]
    denied = [
        ("get", "secrets", "", ns, ""),
        ("list", "secrets", "", other, ""),
        ("get", "secrets", "", "kube-system", ""),
        ("delete", "nodes", "", None, ""),
        ("create", "pods", "", ns, ""),
        ("delete", "jobs", "batch", ns, ""),
        ("delete", "finetunejobs", "kubetune.io", ns, ""),
        ("create", "jobs", "batch", "default", ""),  # outside the watched namespace
        ("list", "finetunejobs", "kubetune.io", "default", ""),
        ("create", "clusterrolebindings", "rbac.authorization.k8s.io", None, ""),
        ("impersonate", "serviceaccounts", "", ns, ""),
        ("patch", "workloads", "kueue.x-k8s.io", ns, ""),  # Kueue's objects are read, never written
        ("list", "workloads", "kueue.x-k8s.io", "default", ""),
    ]
    for verb, resource, group, namespace, sub in allowed:
        assert access(kube, release, verb, resource, group=group, namespace=namespace, subresource=sub), (
            f"the operator may not {verb} {resource}/{sub} in {namespace}"
        )
    for verb, resource, group, namespace, sub in denied:
        assert not access(kube, release, verb, resource, group=group, namespace=namespace, subresource=sub), (
            f"the operator may {verb} {resource} in {namespace}: broader than it needs"
        )


def test_the_restricted_pod_security_level_is_enforced_where_trainers_run(
    kube: KubeClient, release: Release
) -> None:
    ns = kube.get(f"/api/v1/namespaces/{release.namespace}")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    careless_pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "careless"},
        "spec": {"containers": [{"name": "c", "image": "python:3.11"}]},
    }
    with pytest.raises(ApiError) as rejected:
        kube.request("POST", f"/api/v1/namespaces/{release.namespace}/pods?dryRun=All", careless_pod)
    assert rejected.value.status == 403 and "restricted" in rejected.value.message


def test_finetunejob_succeeds_with_the_chart_operator_and_restricted_trainer_pods(
    kube: KubeClient, release: Release, inputs: S3Server, trained: JSON
) -> None:
    status = trained["status"]
    assert condition(trained, "Succeeded")["reason"] == "Completed"
    assert status["observedGeneration"] == trained["metadata"]["generation"]
    adapter = status["adapter"]
    key = adapter["uri"].removeprefix(f"s3://{BUCKET}/") + "adapter_model.safetensors"
    body = inputs.client().get_object(Bucket=BUCKET, Key=key)["Body"].read()
    assert hashlib.sha256(body).hexdigest() == adapter["sha256"]
    # The validation pod and the trainer pod both ran in the restricted namespace, with no GPU asked of the
    # first.
    pods = {
        p["metadata"]["labels"]["app.kubernetes.io/component"]: p
        for p in pods_of(kube, release.namespace, "kubetune.io/job-name=via-helm")
    }
    assert set(pods) == {"validator", "trainer"}
    for pod in pods.values():
        assert pod["status"]["phase"] == "Succeeded"
        (container,) = pod["spec"]["containers"]
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert pods["validator"]["spec"]["containers"][0]["args"] == ["validate"]


def test_reapplying_the_finished_manifest_changes_nothing(
    kube: KubeClient, release: Release, inputs: S3Server, trained: JSON
) -> None:
    ns = release.namespace
    job_path = f"/apis/batch/v1/namespaces/{ns}/jobs/via-helm-trainer"
    trainer_job = kube.get(job_path)
    pods_before = {p["metadata"]["uid"] for p in pods_of(kube, ns, "kubetune.io/job-name=via-helm")}
    kube.apply_yaml(ftj_path(ns), tiny_job("via-helm", inputs))
    after = kube.get(ftj_path(ns, "via-helm"))
    assert after["metadata"]["generation"] == trained["metadata"]["generation"]
    # Give the operator several scrape intervals (1 s each) to do something it should not.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        now = kube.get(ftj_path(ns, "via-helm"))
        assert now["status"]["phase"] == "Succeeded"
        assert now["status"]["adapter"] == trained["status"]["adapter"]
        assert now["status"]["completionTime"] == trained["status"]["completionTime"]
        assert kube.get(job_path)["metadata"]["uid"] == trainer_job["metadata"]["uid"]
        assert {
            p["metadata"]["uid"] for p in pods_of(kube, ns, "kubetune.io/job-name=via-helm")
        } == pods_before
        time.sleep(0.5)
    jobs = kube.get(f"/apis/batch/v1/namespaces/{ns}/jobs", labelSelector="kubetune.io/job-name=via-helm")
    assert sorted(j["metadata"]["name"] for j in jobs["items"]) == ["via-helm-trainer", "via-helm-validate"]


def test_kueue_admits_the_queued_trainer_job_and_it_trains(
    kube: KubeClient, release: Release, inputs: S3Server, kueue: KueueProcess
) -> None:
    """Kueue's own controller, not the test, admits the trainer Job. Queued first into a LocalQueue that does
    not exist yet: the Job stays suspended, and the chart's operator (with the chart's RBAC) shows Kueue's
    Inadmissible message. Once the queue exists Kueue reserves the pod's cpu and memory in its ClusterQueue,
    unsuspends the Job, and the FineTuneJob trains to Succeeded."""
    ns = release.namespace
    queue = f"helm-{uuid.uuid4().hex[:6]}"
    kube.apply_yaml(f"/api/v1/namespaces/{ns}/secrets", s3_secret(inputs.access_key, inputs.secret_key))
    manifest = tiny_job("queued", inputs, queueName=queue)
    manifest["spec"]["resources"].update({"cpu": "500m", "memory": "1Gi"})
    kube.create(ftj_path(ns), manifest)
    job_path = f"/apis/batch/v1/namespaces/{ns}/jobs/queued-trainer"
    # Only the GPU Job is queued: the validation Job carries no queue label and runs first, at once.
    created = kube.wait_for(job_path, bool, timeout=180, what="the trainer Job to be created")
    validate_job = kube.get(f"/apis/batch/v1/namespaces/{ns}/jobs/queued-validate")
    assert "kueue.x-k8s.io/queue-name" not in validate_job["metadata"]["labels"]
    assert validate_job["spec"]["suspend"] is False
    assert created["spec"]["suspend"] is True
    assert created["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == queue
    kueue_says = f"LocalQueue {queue} doesn't exist"
    held = kube.wait_for(
        ftj_path(ns, "queued"),
        lambda o: kueue_says in str((condition(o, "Suspended") or {}).get("message")),
        timeout=60,
        what=f"Suspended=True/Queued with Kueue's {kueue_says!r}",
    )
    waiting = condition(held, "Suspended")
    assert (waiting["status"], waiting["reason"]) == ("True", "Queued")
    assert waiting["message"].endswith(f"(Inadmissible): {kueue_says}")
    assert not pods_of(kube, ns, "kubetune.io/job-name=queued,app.kubernetes.io/component=trainer")
    (validator,) = pods_of(kube, ns, "kubetune.io/job-name=queued,app.kubernetes.io/component=validator")
    assert validator["status"]["phase"] == "Succeeded"
    assert (condition(held, "Validated") or {}).get("reason") == "DataValid"
    assert kube.get(job_path)["spec"]["suspend"] is True

    kueue_harness.make_queue(kube, ns, {"cpu": "2", "memory": "4Gi", "nvidia.com/gpu": "1"}, name=queue)
    done = kube.wait_for(
        ftj_path(ns, "queued"),
        lambda o: (o.get("status") or {}).get("phase") in ("Succeeded", "Failed"),
        timeout=300,
        what="the queued FineTuneJob to be admitted and finish",
    )
    assert done["status"]["phase"] == "Succeeded", (
        f"{condition(done, 'Failed')}\n{operator_debug(kube, release)}"
    )
    admitted = condition(done, "Suspended")
    assert (admitted["status"], admitted["reason"]) == ("False", "Admitted")
    assert (
        admitted["message"] == f"Kueue admitted the trainer Job from queue {queue} into ClusterQueue {queue}"
    )

    trainer_job = kube.get(job_path)
    (workload,) = kueue_harness.workloads_of_job(kube, ns, trainer_job)
    assert (kueue_harness.workload_condition(workload, "Admitted") or {}).get("status") == "True"
    (assignment,) = workload["status"]["admission"]["podSetAssignments"]
    assert assignment["resourceUsage"] == {"cpu": "500m", "memory": "1Gi"}
    assert workload["status"]["admission"]["clusterQueue"] == queue
    # The API server's record of who wrote spec.suspend last: Kueue's manager (update), never the operator
    # (which created the Job with suspend: true) nor this test.
    writers = [
        entry["manager"]
        for entry in trainer_job["metadata"]["managedFields"]
        if '"f:suspend"' in json.dumps(entry.get("fieldsV1", {})) and entry["operation"] == "Update"
    ]
    assert writers and all(w.startswith("kueue") for w in writers), trainer_job["metadata"]["managedFields"]
    print(f"held: {waiting['message']}\nspec.suspend last written by {writers}; {admitted['message']}")
    assert trainer_job["spec"]["suspend"] is False


def test_helm_test_passes(release: Release) -> None:
    # The hook pod exits non-zero unless the CRD is Established and every operator pod answers /healthz.
    result = release.helm(
        "test", RELEASE, "--namespace", release.system_namespace, "--timeout", "3m", check=False
    )
    assert result.returncode == 0, f"helm test failed:\n{result.stdout}\n{result.stderr}"
    suites = re.findall(r"TEST SUITE:\s+(\S+)\n(?:.*\n){2}Phase:\s+(\w+)", result.stdout)
    assert (f"{FULLNAME}-helm-test", "Succeeded") in suites, result.stdout


def test_helm_uninstall_keeps_the_crd_and_the_finetunejobs(
    kube: KubeClient, release: Release, trained: JSON
) -> None:
    release.helm("uninstall", RELEASE, "--namespace", release.system_namespace, "--wait")
    assert (
        kube.get_or_none(f"/apis/apps/v1/namespaces/{release.system_namespace}/deployments/{FULLNAME}")
        is None
    )
    assert kube.get_or_none(f"/apis/rbac.authorization.k8s.io/v1/clusterroles/{FULLNAME}-cluster") is None
    assert kube.get_or_none(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{CRD_NAME}") is not None
    kept = kube.get(ftj_path(release.namespace, "via-helm"))
    assert kept["metadata"]["uid"] == trained["metadata"]["uid"]
    assert kept["status"]["phase"] == "Succeeded"

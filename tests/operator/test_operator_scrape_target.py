"""Which pod the operator connects to when it scrapes a FineTuneJob, and what it logs when that fails.

The operator opens a connection to an IP address taken from a pod's status, so only a pod that this
FineTuneJob's own trainer Job controls qualifies; and whatever the pod answers stays out of logs and
status."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fake_cluster import FakeCluster
from kubernetes import client as k8s_client
from operator_factories import NAMESPACE, make_job, make_pod, metrics_text, ts
from trainer_page_server import TrainerPageServer, page, raw, redirect

from kubetune_operator import handlers
from kubetune_operator.config import OperatorConfig
from kubetune_operator.handlers import Runtime, scrape_job
from kubetune_operator.k8s_io import KubeIO
from kubetune_operator.operator_metrics import OperatorMetrics
from kubetune_trainer import contract

LOG = logging.getLogger("test")
POD_IP = "10.1.2.3"
PAGE = metrics_text(**{contract.METRIC_STEP: 50, contract.METRIC_TOTAL_STEPS: 200})

Obj = dict[str, Any]


def started(cluster: FakeCluster, config: OperatorConfig) -> Runtime:
    """A FineTuneJob whose children the operator has created."""
    cluster.put(make_job())
    rt = Runtime(config=config, metrics=OperatorMetrics(), io=cluster)
    handlers.sync(rt, NAMESPACE, "a", scrape=False, logger=LOG)
    return rt


def trainer_job(cluster: FakeCluster) -> Obj:
    job = cluster.get("Job", NAMESPACE, "a-trainer")
    assert job is not None
    return job


def running_pod(cluster: FakeCluster, ip: str = POD_IP) -> Obj:
    """A running trainer pod controlled by the trainer Job, as the Job controller makes it."""
    job_uid = trainer_job(cluster)["metadata"]["uid"]
    pod = make_pod(phase="Running", ip=ip, running_since=ts(20))
    pod["metadata"]["ownerReferences"][0]["uid"] = job_uid
    pod["metadata"]["labels"]["batch.kubernetes.io/controller-uid"] = job_uid
    return pod


def not_controller(pod: Obj) -> None:
    del pod["metadata"]["ownerReferences"][0]["controller"]


def another_jobs_pod(pod: Obj) -> None:
    pod["metadata"]["labels"]["batch.kubernetes.io/controller-uid"] = "uid-of-some-other-job"


def controlled_by_a_replicaset(pod: Obj) -> None:
    pod["metadata"]["ownerReferences"][0]["kind"] = "ReplicaSet"


@pytest.mark.parametrize(
    "forge",
    [
        pytest.param(not_controller, id="owner-reference-without-controller"),
        pytest.param(another_jobs_pod, id="controller-uid-label-of-another-job"),
        pytest.param(controlled_by_a_replicaset, id="controller-is-not-a-job"),
    ],
)
def test_only_a_pod_the_trainer_job_controls_is_scraped(
    config: OperatorConfig, forge: Callable[[Obj], None]
) -> None:
    cluster = FakeCluster()
    rt = started(cluster, config)
    cluster.metrics_pages[POD_IP] = PAGE
    pod = running_pod(cluster)
    forged = copy.deepcopy(pod)
    forge(forged)
    cluster.put(forged)
    scrape_job(rt, NAMESPACE, "a")
    assert cluster.calls["scrape"] == 0
    cluster.put(pod)  # the real trainer pod, same name: now it is scraped
    scrape_job(rt, NAMESPACE, "a")
    assert cluster.calls["scrape"] == 1


def test_a_trainer_job_this_finetunejob_does_not_control_is_not_scraped(config: OperatorConfig) -> None:
    cluster = FakeCluster()
    rt = started(cluster, config)
    cluster.metrics_pages[POD_IP] = PAGE
    job = trainer_job(cluster)
    ours = copy.deepcopy(job["metadata"]["ownerReferences"])
    job["metadata"]["ownerReferences"] = [{**ours[0], "uid": "uid-of-another-finetunejob"}]
    cluster.put(running_pod(cluster))
    scrape_job(rt, NAMESPACE, "a")
    assert cluster.calls["scrape"] == 0
    job["metadata"]["ownerReferences"] = ours
    scrape_job(rt, NAMESPACE, "a")
    assert cluster.calls["scrape"] == 1


class LocalPageCluster(FakeCluster):
    """Scrapes go to a real local server, through the operator's own reader."""

    def __init__(self, port: int, config: OperatorConfig) -> None:
        super().__init__()
        self.port = port
        self.reader = KubeIO(k8s_client.ApiClient(), config)

    def scrape(self, pod_ip: str, port: int) -> str:
        self.calls["scrape"] += 1
        return self.reader.scrape(pod_ip, self.port)


SECRET = "tenant-s3cr3t-4242"


@pytest.fixture
def server() -> Iterator[TrainerPageServer]:
    with TrainerPageServer() as running:
        yield running


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(page(f'kubetune_trainer_step{{token="{SECRET}" 1\n'.encode()), id="not-prometheus-text"),
        pytest.param(page(SECRET.encode(), status=f"500 {SECRET}"), id="server-error"),
        pytest.param(redirect(f"/{SECRET}"), id="redirect"),
        pytest.param(raw(f"{SECRET} 200\r\n\r\n".encode()), id="not-http"),
        pytest.param(
            raw(f"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{SECRET}\r\n".encode()),
            id="bad-chunk",
        ),
    ],
)
def test_a_failed_scrape_logs_no_byte_of_the_answer(
    config: OperatorConfig,
    server: TrainerPageServer,
    answer: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cluster = LocalPageCluster(server.port, config)
    rt = started(cluster, config)
    cluster.put(running_pod(cluster, ip="127.0.0.1"))
    server.answer = answer
    with caplog.at_level(logging.DEBUG):
        scrape_job(rt, NAMESPACE, "a")
    assert cluster.calls["scrape"] == 1 and server.record.paths == ["/metrics"]
    logged = caplog.text + "".join(
        logging.Formatter().formatException(r.exc_info) for r in caplog.records if r.exc_info
    )
    assert "trainer metrics" in logged  # the failure was logged ...
    assert SECRET not in logged  # ... without the answer
    assert SECRET not in str(cluster.get("FineTuneJob", NAMESPACE, "a"))

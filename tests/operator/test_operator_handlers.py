"""Handlers driven directly with kopf-style kwargs and an injected in-memory cluster."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import kopf
import pytest
from fake_cluster import FakeCluster
from kopf._cogs.structs.references import Resource
from kopf._core.intents import causes
from kubernetes.client.exceptions import ApiException
from lease_store import LeaseStore
from operator_factories import (
    NAMESPACE,
    failure_summary,
    job_condition,
    make_job,
    make_pod,
    metrics_text,
    success_summary,
    terminated,
    ts,
)

from kubetune_operator import handlers
from kubetune_operator.conditions import now_rfc3339
from kubetune_operator.config import OperatorConfig
from kubetune_operator.handlers import (
    Runtime,
    on_child_event,
    on_cleanup,
    on_finetunejob,
    on_finetunejob_deleted,
    on_startup,
    register_handlers,
    scrape_job,
    start_queue,
    status_patch,
)
from kubetune_operator.leader import LeaderElector
from kubetune_operator.models import FineTuneJobStatus
from kubetune_operator.observed import is_finished_job
from kubetune_operator.operator_metrics import OperatorMetrics
from kubetune_operator.scraping import ScrapeLoop
from kubetune_trainer import contract

LOG = logging.getLogger("test")


@pytest.fixture
def cluster() -> FakeCluster:
    return FakeCluster()


@pytest.fixture
def memo(cluster: FakeCluster, config: OperatorConfig) -> Iterator[kopf.Memo]:
    rt = Runtime(config=config, metrics=OperatorMetrics(), io=cluster)
    queue = start_queue(rt, threads=1)
    yield kopf.Memo(runtime=rt)
    queue.close()


def runtime(memo: kopf.Memo) -> Runtime:
    return handlers.runtime_of(memo)


def fire(memo: kopf.Memo, name: str = "a") -> None:
    on_finetunejob(name=name, namespace=NAMESPACE, memo=memo, logger=LOG, body={}, spec={})


def child_event(memo: kopf.Memo, obj: dict[str, Any], type_: str = "MODIFIED") -> None:
    """Deliver a watch event of a Job or pod, and wait for the pass it queued."""
    asyncio.run(on_child_event(body=obj, namespace=NAMESPACE, memo=memo, logger=LOG, type=type_))
    assert handlers.queue_of(runtime(memo)).drain()


def status(cluster: FakeCluster, name: str = "a") -> dict[str, Any]:
    ftj = cluster.get("FineTuneJob", NAMESPACE, name)
    assert ftj is not None
    result: dict[str, Any] = ftj.get("status") or {}
    return result


def conditions(cluster: FakeCluster, name: str = "a") -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status(cluster, name).get("conditions", [])}


def job_pod(cluster: FakeCluster, **kwargs: Any) -> dict[str, Any]:
    job = cluster.get("Job", NAMESPACE, "a-trainer")
    assert job is not None
    pod = make_pod(**kwargs)
    pod["metadata"]["ownerReferences"][0]["uid"] = job["metadata"]["uid"]
    return cluster.put(pod)


def complete_trainer_job(cluster: FakeCluster, memo: kopf.Memo) -> dict[str, Any]:
    """The trainer exits 0 with its summary and its Job completes; the Job's watch event is delivered."""
    job = cluster.get("Job", NAMESPACE, "a-trainer")
    assert job is not None
    job["status"] = {"succeeded": 1, "conditions": [job_condition("Complete")], "completionTime": ts(400)}
    job_pod(cluster, phase="Succeeded", terminated=terminated(0, success_summary()))
    child_event(memo, job)
    return job


def test_create_makes_children_and_writes_status_once(cluster: FakeCluster, memo: kopf.Memo) -> None:
    cluster.put(make_job())
    fire(memo)
    config_map = cluster.get("ConfigMap", NAMESPACE, "a-config")
    job = cluster.get("Job", NAMESPACE, "a-trainer")
    assert (
        config_map is not None
        and contract.TrainerConfig.from_json(config_map["data"]["config.json"]).job.name == "a"
    )
    assert job is not None and job["spec"]["suspend"] is False
    assert status(cluster)["phase"] == "Pending" and status(cluster)["trainerJob"] == "a-trainer"
    assert cluster.calls["patch_status"] == 1
    assert ("Normal", "Created", "a") in cluster.events


def test_resume_after_restart_creates_no_duplicates_and_writes_nothing(
    cluster: FakeCluster, memo: kopf.Memo
) -> None:
    cluster.put(make_job())
    fire(memo)
    before = dict(cluster.calls)
    events = len(cluster.events)
    fire(memo)  # the operator restarted: @kopf.on.resume
    assert cluster.calls["create:Job"] == before["create:Job"] == 1
    assert cluster.calls["create:ConfigMap"] == 1
    assert cluster.calls["patch_status"] == before["patch_status"]
    assert len(cluster.events) == events


def test_pod_events_and_scrapes_carry_the_job_to_training(cluster: FakeCluster, memo: kopf.Memo) -> None:
    cluster.put(make_job())
    fire(memo)
    pod = job_pod(cluster, phase="Running", ip="10.1.2.3", running_since=now_rfc3339())
    child_event(memo, pod)
    assert conditions(cluster)["Running"] == ("True", "TrainerStarting")
    assert cluster.calls["scrape"] == 0  # pod events do not scrape
    cluster.metrics_pages["10.1.2.3"] = metrics_text(
        **{
            contract.METRIC_STEP: 50,
            contract.METRIC_TOTAL_STEPS: 200,
            contract.METRIC_TRAIN_LOSS: 1.7,
            contract.METRIC_TOKENS_PER_SECOND: 4096,
        }
    )
    scrape_job(runtime(memo), NAMESPACE, "a")
    assert conditions(cluster)["Running"] == ("True", "Training")
    assert status(cluster)["progress"]["percent"] == 25.0
    assert status(cluster)["metrics"]["trainLoss"] == 1.7
    metrics = runtime(memo).metrics.registry
    assert metrics.get_sample_value("kubetune_finetunejob_step", {"namespace": NAMESPACE, "name": "a"}) == 50
    assert metrics.get_sample_value("kubetune_operator_time_to_trainer_start_seconds_count") == 1


def test_unreachable_trainer_metrics_do_not_fail_the_pass(cluster: FakeCluster, memo: kopf.Memo) -> None:
    cluster.put(make_job())
    fire(memo)
    job_pod(cluster, phase="Running", ip="10.9.9.9", running_since=now_rfc3339())
    scrape_job(runtime(memo), NAMESPACE, "a")
    assert cluster.calls["scrape"] == 1
    assert conditions(cluster)["Running"] == ("True", "TrainerStarting")


def test_job_completion_records_the_adapter(cluster: FakeCluster, memo: kopf.Memo) -> None:
    cluster.put(make_job())
    fire(memo)
    complete_trainer_job(cluster, memo)
    assert status(cluster)["phase"] == "Succeeded"
    assert status(cluster)["adapter"]["sha256"] == "ab" * 32
    assert ("Normal", "Completed", "a") in cluster.events
    registry = runtime(memo).metrics.registry
    assert (
        registry.get_sample_value("kubetune_operator_job_duration_seconds_count", {"outcome": "Succeeded"})
        == 1
    )
    assert registry.get_sample_value("kubetune_operator_finetunejobs", {"phase": "Succeeded"}) == 1


def test_a_finished_job_costs_no_reads_of_its_children(cluster: FakeCluster, memo: kopf.Memo) -> None:
    cluster.put(make_job())
    fire(memo)
    job = complete_trainer_job(cluster, memo)
    assert status(cluster)["phase"] == "Succeeded"
    before = dict(cluster.calls)
    fire(memo)  # the operator restarted: @kopf.on.resume
    child_event(memo, job)  # e.g. the Job removed by its TTL
    assert {call: cluster.calls[call] - before[call] for call in before} == {
        **dict.fromkeys(before, 0),
        "get_finetunejob": 2,
    }
    assert status(cluster)["phase"] == "Succeeded"


def test_stopped_pod_seen_only_in_its_watch_event_records_the_checkpoint(
    cluster: FakeCluster, memo: kopf.Memo
) -> None:
    """Suspension deletes the trainer pod: by the time the operator lists pods, the stopped pod may be gone;
    its last state (exit 143, the Interrupted summary with the checkpoint) arrives in the watch event."""
    cluster.put(make_job())
    fire(memo)
    body = cluster.get("FineTuneJob", NAMESPACE, "a")
    assert body is not None
    body["spec"]["suspend"] = True
    fire(memo)
    summary = contract.TerminationSummary(
        outcome="Failed",
        reason=contract.TrainerReason.INTERRUPTED,
        message="stopped by SIGTERM after step 70",
        checkpoint={"uri": "s3://adapters/support-bot/checkpoints/step-70/", "step": 70},
    ).to_json()
    stopped = job_pod(cluster, phase="Failed", terminated=terminated(contract.EXIT_CODE_INTERRUPTED, summary))
    stopped["kind"] = "Pod"
    cluster.delete("Pod", NAMESPACE, stopped["metadata"]["name"])
    child_event(memo, stopped, "DELETED")
    assert status(cluster)["checkpoint"] == {
        "uri": "s3://adapters/support-bot/checkpoints/step-70/",
        "step": 70,
    }
    assert status(cluster)["phase"] == "Suspended"
    assert conditions(cluster)["Suspended"] == ("True", "Suspended")


def test_pods_of_another_job_with_the_same_label_are_ignored(cluster: FakeCluster, memo: kopf.Memo) -> None:
    cluster.put(make_job())
    fire(memo)
    stranger = make_pod(phase="Running", ip="10.0.0.1", running_since=now_rfc3339())
    stranger["metadata"]["ownerReferences"][0]["uid"] = "some-older-job"
    cluster.put(stranger)
    child_event(memo, stranger)
    assert conditions(cluster)["Running"] == ("False", "Created")


def test_suspend_update_patches_the_trainer_job(cluster: FakeCluster, memo: kopf.Memo) -> None:
    body = cluster.put(make_job())
    fire(memo)
    body = cluster.get("FineTuneJob", NAMESPACE, "a")
    assert body is not None
    body["spec"]["suspend"] = True
    fire(memo)  # @kopf.on.update(field="spec")
    job = cluster.get("Job", NAMESPACE, "a-trainer")
    assert job is not None and job["spec"]["suspend"] is True
    assert status(cluster)["phase"] == "Suspended"
    assert ("Normal", "Suspended", "a") in cluster.events


def test_spec_edits_reach_the_trainer_job_or_warn_once(cluster: FakeCluster, memo: kopf.Memo) -> None:
    cluster.put(make_job())
    fire(memo)
    body = cluster.get("FineTuneJob", NAMESPACE, "a")
    assert body is not None
    body["spec"]["backoffLimit"] = 8
    body["spec"]["ttlSecondsAfterFinished"] = 300
    body["spec"]["resources"] = {"gpus": 2}
    body["metadata"]["generation"] = 2
    fire(memo)
    job = cluster.get("Job", NAMESPACE, "a-trainer")
    assert job is not None
    assert (job["spec"]["backoffLimit"], job["spec"]["ttlSecondsAfterFinished"]) == (8, 300)
    assert job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": 1}
    assert ("Normal", "TrainerJobUpdated", "a") in cluster.events
    assert ("Warning", "SpecChangeNotApplied", "a") in cluster.events
    patches, events = cluster.calls["patch_job_spec"], len(cluster.events)
    fire(memo)  # the same generation again: nothing left to patch, nothing new to say
    assert cluster.calls["patch_job_spec"] == patches and len(cluster.events) == events


def test_rejected_job_fails_with_child_rejected(cluster: FakeCluster, memo: kopf.Memo) -> None:
    cluster.put(make_job())
    cluster.reject_kinds["Job"] = 'spec.template.spec.priorityClassName: Invalid value: "Bad_Name"'
    fire(memo)
    assert cluster.get("Job", NAMESPACE, "a-trainer") is None
    assert cluster.get("ConfigMap", NAMESPACE, "a-config") is not None
    assert conditions(cluster)["Failed"] == ("True", "ChildRejected")
    assert "Bad_Name" in status(cluster)["message"]
    assert ("Warning", "ChildRejected", "a") in cluster.events


def test_a_forbidden_child_fails_the_job_once_instead_of_retrying(
    cluster: FakeCluster, memo: kopf.Memo
) -> None:
    cluster.put(make_job())
    cluster.forbid_kinds["Job"] = (
        'jobs.batch "a-trainer" is forbidden: cannot set blockOwnerDeletion if an ownerReference refers to '
        "a resource you can't set finalizers on"
    )
    fire(memo)  # no kopf.TemporaryError: the job ends here
    assert cluster.get("Job", NAMESPACE, "a-trainer") is None
    assert conditions(cluster)["Failed"] == ("True", "ChildForbidden")
    assert "cannot set blockOwnerDeletion" in status(cluster)["message"]
    assert ("Warning", "ChildForbidden", "a") in cluster.events
    creates = cluster.calls["create:Job"]
    fire(memo)  # a finished job never tries again
    assert cluster.calls["create:Job"] == creates


def test_api_errors_are_counted_on_every_road_and_retried_there(
    cluster: FakeCluster, memo: kopf.Memo
) -> None:
    cluster.put(make_job())
    cluster.fail_with = ApiException(status=500, reason="etcdserver: request timed out")
    delays = []
    for retry in range(7):  # kopf retries after the error's delay, longer each time, up to a cap
        with pytest.raises(kopf.TemporaryError) as raised:
            on_finetunejob(name="a", namespace=NAMESPACE, memo=memo, logger=LOG, retry=retry)
        delays.append(raised.value.delay)
    assert delays == [10, 20, 40, 80, 160, 300, 300]
    scrape_job(runtime(memo), NAMESPACE, "a")  # logged; the next round tries again
    child_event(memo, make_pod())  # the work queue tries again after its delay
    registry = runtime(memo).metrics.registry
    assert (
        registry.get_sample_value("kubetune_operator_reconcile_errors_total", {"error": "ApiException"}) == 9
    )


def test_events_of_a_deleted_job_are_ignored_and_its_series_dropped(
    cluster: FakeCluster, memo: kopf.Memo
) -> None:
    cluster.put(make_job())
    fire(memo)
    registry = runtime(memo).metrics.registry
    assert registry.get_sample_value("kubetune_operator_finetunejobs", {"phase": "Pending"}) == 1
    cluster.delete("FineTuneJob", NAMESPACE, "a")
    job = cluster.get("Job", NAMESPACE, "a-trainer")
    assert job is not None
    writes = cluster.calls["patch_status"]
    child_event(memo, job)  # the Job's cascade deletion: no error, nothing written
    assert cluster.calls["patch_status"] == writes
    assert registry.get_sample_value("kubetune_operator_finetunejobs", {"phase": "Pending"}) == 0


def test_deleted_watch_event_drops_the_jobs_series(cluster: FakeCluster, memo: kopf.Memo) -> None:
    cluster.put(make_job())
    fire(memo)
    registry = runtime(memo).metrics.registry
    asyncio.run(on_finetunejob_deleted(name="a", namespace=NAMESPACE, memo=memo, type="MODIFIED"))
    assert registry.get_sample_value("kubetune_operator_finetunejobs", {"phase": "Pending"}) == 1
    cluster.delete("FineTuneJob", NAMESPACE, "a")
    asyncio.run(on_finetunejob_deleted(name="a", namespace=NAMESPACE, memo=memo, type="DELETED"))
    assert handlers.queue_of(runtime(memo)).drain()
    assert registry.get_sample_value("kubetune_operator_finetunejobs", {"phase": "Pending"}) == 0


def test_results_are_held_until_recorded_then_let_go(cluster: FakeCluster, memo: kopf.Memo) -> None:
    """The trainer Job and its pods carry the result finalizer until the outcome is in status; an earlier
    run's children in the way of a re-applied job, and a deleted job's children, are let go too."""
    cluster.put(make_job())
    fire(memo)
    job = cluster.get("Job", NAMESPACE, "a-trainer")
    assert job is not None and job["metadata"]["finalizers"] == ["kubetune.io/result"]
    assert job["spec"]["template"]["metadata"]["finalizers"] == ["kubetune.io/result"]
    job["metadata"]["finalizers"].append("other.io/keep")
    running = job_pod(cluster, phase="Running", running_since=now_rfc3339(), ip="10.0.0.9")
    running["metadata"]["finalizers"] = ["kubetune.io/result", "batch.kubernetes.io/job-tracking"]
    child_event(memo, running)
    assert cluster.calls["remove_finalizer:Pod"] == cluster.calls["remove_finalizer:Job"] == 0

    cluster.delete("Pod", NAMESPACE, running["metadata"]["name"])
    done = job_pod(cluster, phase="Succeeded", terminated=terminated(0, success_summary()), created=5)
    done["metadata"]["finalizers"] = ["kubetune.io/result"]
    job["status"] = {"succeeded": 1, "conditions": [job_condition("Complete")], "completionTime": ts(400)}
    child_event(memo, job)
    assert conditions(cluster)["Succeeded"][0] == "True"
    assert done["metadata"]["finalizers"] == []
    assert job["metadata"]["finalizers"] == ["other.io/keep"]  # only ours is removed
    ftj = cluster.get("FineTuneJob", NAMESPACE, "a")
    assert ftj is not None and ftj["metadata"]["annotations"]["kubetune.io/result-recorded"] == "true"
    reads = cluster.calls["get_job"]
    fire(memo)  # a finished, recorded job: no child is read again
    assert cluster.calls["get_job"] == reads


def test_a_deleted_jobs_held_children_are_let_go(cluster: FakeCluster, memo: kopf.Memo) -> None:
    cluster.put(make_job())
    fire(memo)
    pod = job_pod(cluster, phase="Running", running_since=now_rfc3339(), ip="10.0.0.9")
    pod["metadata"]["finalizers"] = ["kubetune.io/result"]
    cluster.delete("FineTuneJob", NAMESPACE, "a")
    asyncio.run(on_finetunejob_deleted(name="a", namespace=NAMESPACE, memo=memo, type="DELETED"))
    assert handlers.queue_of(runtime(memo)).drain()
    job = cluster.get("Job", NAMESPACE, "a-trainer")
    assert job is not None and job["metadata"]["finalizers"] == [] and pod["metadata"]["finalizers"] == []


def test_child_events_without_the_label_do_nothing(cluster: FakeCluster, memo: kopf.Memo) -> None:
    child_event(memo, {"metadata": {"name": "x", "labels": {}}})
    assert sum(cluster.calls.values()) == 0


def test_status_patch_nulls_dropped_fields() -> None:
    old = FineTuneJobStatus(phase="Failed", message="bad", trainer_job=None)
    new = FineTuneJobStatus(phase="Pending", trainer_job="a-trainer")
    assert status_patch(old, new) == {
        "phase": "Pending",
        "trainerJob": "a-trainer",
        "conditions": [],
        "message": None,
    }


def test_register_handlers_wires_every_trigger() -> None:
    registry = kopf.OperatorRegistry()
    register_handlers(registry)
    changing = registry._changing.get_all_handlers()
    triggers = {"resume" if h.initial else h.reason for h in changing if h.fn is on_finetunejob}
    assert triggers == {"resume", causes.Reason.CREATE, causes.Reason.UPDATE}
    update = next(h for h in changing if h.reason == causes.Reason.UPDATE)
    assert update.field == ("spec",)
    assert all(h.requires_finalizer is not True for h in changing)
    # No kopf timers or daemons: they would put a finalizer on every running FineTuneJob.
    assert registry._spawning.get_all_handlers() == []
    watched = {(h.selector.group, h.selector.any_name, h.fn) for h in registry._watching.get_all_handlers()}
    assert watched == {
        ("batch", "jobs", on_child_event),
        ("", "pods", on_child_event),
        ("kubetune.io", "finetunejobs", on_finetunejob_deleted),
    }
    activities = {h.activity for h in registry._activities.get_all_handlers()}
    assert {causes.Activity.STARTUP, causes.Activity.AUTHENTICATION, causes.Activity.CLEANUP} <= activities


def test_scrape_loop_follows_the_phase_each_pass_computes(cluster: FakeCluster, memo: kopf.Memo) -> None:
    rt = runtime(memo)
    rt.scraper = ScrapeLoop(0.01, lambda ns, name: scrape_job(rt, ns, name))
    cluster.put(make_job())
    fire(memo)
    assert rt.scraper.running() == []  # Pending: nothing to scrape
    pod = job_pod(cluster, phase="Running", ip="10.1.2.3", running_since=now_rfc3339())
    child_event(memo, pod)
    assert rt.scraper.running() == [(NAMESPACE, "a")]
    cluster.metrics_pages["10.1.2.3"] = metrics_text(
        **{contract.METRIC_STEP: 7, contract.METRIC_TOTAL_STEPS: 70}
    )
    assert rt.scraper.run_round() == 1
    assert status(cluster)["progress"]["step"] == 7
    complete_trainer_job(cluster, memo)
    assert rt.scraper.running() == []
    scrapes = cluster.calls["scrape"]
    assert rt.scraper.run_round() == 0 and cluster.calls["scrape"] == scrapes


def test_deleted_job_leaves_the_scrape_loop(cluster: FakeCluster, memo: kopf.Memo) -> None:
    rt = runtime(memo)
    rt.scraper = ScrapeLoop(0.01, lambda ns, name: scrape_job(rt, ns, name))
    rt.scraper.track(NAMESPACE, "a", True)
    asyncio.run(on_finetunejob_deleted(name="a", namespace=NAMESPACE, memo=memo, type="DELETED"))
    assert rt.scraper.running() == []


def test_a_waiting_pass_covers_later_requests_for_the_same_job(cluster: FakeCluster, memo: kopf.Memo) -> None:
    cluster.put(make_job())
    fire(memo)
    rt = runtime(memo)
    reads = cluster.calls["get_finetunejob"]
    with rt.locks.hold((NAMESPACE, "a"), []) as pods:
        assert pods is not None
        # Another thread waits for the lock; two more events arrive meanwhile.
        waiter = threading.Thread(target=fire, args=(memo,))
        waiter.start()
        deadline = time.monotonic() + 5
        while (NAMESPACE, "a") not in rt.locks._waiting and time.monotonic() < deadline:
            time.sleep(0.01)
        fire(memo)
        fire(memo)
    waiter.join(5)
    assert cluster.calls["get_finetunejob"] == reads + 1  # one pass for three requests
    fire(memo)  # nothing waits any more: a new request runs its own pass
    assert cluster.calls["get_finetunejob"] == reads + 2


def test_a_covered_request_hands_its_ended_pods_to_the_waiting_pass(
    cluster: FakeCluster, memo: kopf.Memo
) -> None:
    """The waiting pass lists pods from the API, where a stopped pod may already be gone: the ended pod a
    skipped request carried must reach that pass, or its checkpoint is lost."""
    cluster.put(make_job())
    fire(memo)
    summary = contract.TerminationSummary(
        outcome="Failed",
        reason=contract.TrainerReason.INTERRUPTED,
        checkpoint={"uri": "s3://adapters/support-bot/checkpoints/step-70/", "step": 70},
    ).to_json()
    stopped = job_pod(cluster, phase="Failed", terminated=terminated(contract.EXIT_CODE_INTERRUPTED, summary))
    cluster.delete("Pod", NAMESPACE, stopped["metadata"]["name"])
    rt = runtime(memo)
    with rt.locks.hold((NAMESPACE, "a"), []) as pods:
        assert pods is not None
        waiter = threading.Thread(target=fire, args=(memo,))  # a pass that carries no pods
        waiter.start()
        deadline = time.monotonic() + 5
        while (NAMESPACE, "a") not in rt.locks._waiting and time.monotonic() < deadline:
            time.sleep(0.01)
        handlers.sync(rt, NAMESPACE, "a", scrape=False, logger=LOG, event_pods=[stopped])  # covered
        assert "checkpoint" not in status(cluster)
    waiter.join(5)
    assert status(cluster)["checkpoint"] == {
        "uri": "s3://adapters/support-bot/checkpoints/step-70/",
        "step": 70,
    }


def test_startup_configures_kopf(memo: kopf.Memo, cluster: FakeCluster) -> None:
    settings = kopf.OperatorSettings()
    on_startup(settings=settings, memo=memo, logger=LOG)
    assert settings.watching.server_timeout == 300 and settings.watching.client_timeout == 330
    assert settings.networking.request_timeout == 30
    assert settings.execution.max_workers == handlers.HANDLER_THREADS
    assert settings.posting.level == logging.WARNING
    assert isinstance(settings.persistence.progress_storage, kopf.AnnotationsProgressStorage)
    assert settings.persistence.progress_storage.prefix == "kubetune.io"
    assert isinstance(settings.persistence.diffbase_storage, kopf.AnnotationsDiffBaseStorage)
    assert settings.persistence.diffbase_storage.prefix == "kubetune.io"
    assert settings.peering.standalone is True  # replicas elect their active one with a Lease instead
    assert runtime(memo).io is cluster  # an injected client is kept
    assert runtime(memo).scraper is not None
    on_cleanup(memo=memo)


def test_child_watches_are_filtered_by_the_api_server(memo: kopf.Memo) -> None:
    settings = kopf.OperatorSettings()
    on_startup(settings=settings, memo=memo, logger=LOG)
    on_cleanup(memo=memo)
    selectors = settings.watching.label_selectors
    pods = Resource("", "v1", "pods", kind="Pod", namespaced=True, verbs=["list", "watch"])
    jobs = Resource("batch", "v1", "jobs", kind="Job", namespaced=True, verbs=["list", "watch"])
    ftjs = Resource("kubetune.io", "v1alpha1", "finetunejobs", kind="FineTuneJob", namespaced=True)
    assert selectors.collect(pods) == selectors.collect(jobs) == ["kubetune.io/job-name"]
    assert selectors.collect(ftjs) == []
    configmaps = Resource("", "v1", "configmaps", kind="ConfigMap", namespaced=True)
    assert selectors.collect(configmaps) == []


def test_a_standby_replica_reads_and_writes_nothing(cluster: FakeCluster, memo: kopf.Memo) -> None:
    leases = LeaseStore()
    LeaderElector(leases, NAMESPACE, "kubetune", "other").try_acquire_or_renew()
    standby = LeaderElector(leases, NAMESPACE, "kubetune", "me")
    assert standby.try_acquire_or_renew() is False
    runtime(memo).leader = standby
    cluster.put(make_job())
    fire(memo)
    assert not cluster.calls and "status" not in cluster.get("FineTuneJob", NAMESPACE, "a")
    runtime(memo).leader = LeaderElector(leases, NAMESPACE, "kubetune", "other")
    assert runtime(memo).leader.try_acquire_or_renew()
    fire(memo)
    assert status(cluster)["conditions"] and cluster.get("Job", NAMESPACE, "a-trainer") is not None


def test_losing_the_lease_stops_the_scrape_loop_and_the_work_queue(
    cluster: FakeCluster, memo: kopf.Memo
) -> None:
    on_startup(settings=kopf.OperatorSettings(), memo=memo, logger=LOG)
    rt = runtime(memo)
    assert rt.scraper is not None and rt.queue is not None
    cluster.put(make_job())
    handlers.stop_work(rt)
    rt.queue.add((NAMESPACE, "a"))
    assert not rt.queue.drain(0.5) or rt.queue.depth() == 0
    assert not cluster.calls  # the closed queue started no pass
    assert rt.scraper._thread is None


@pytest.mark.parametrize(
    ("conditions", "finished"),
    [
        ([], False),
        ([{"type": "Suspended", "status": "True"}], False),
        ([{"type": "Complete", "status": "False"}], False),
        ([{"type": "SuccessCriteriaMet", "status": "True"}], True),
        ([{"type": "Complete", "status": "True"}], True),
        ([{"type": "FailureTarget", "status": "True"}], True),
        ([{"type": "Failed", "status": "True"}], True),
    ],
)
def test_a_finished_trainer_job_is_told_apart_for_the_urgent_lane(
    conditions: list[dict[str, str]], finished: bool
) -> None:
    assert is_finished_job({"kind": "Job", "status": {"conditions": conditions}}) is finished


def test_a_refused_pod_is_found_in_the_jobs_events_stalls_and_clears(
    cluster: FakeCluster, memo: kopf.Memo
) -> None:
    cluster.put(make_job())
    fire(memo)
    job = cluster.get("Job", NAMESPACE, "a-trainer")
    assert job is not None
    assert conditions(cluster)["Running"] == ("False", "Created")
    # Another Job's event, and a FailedCreate on ours: only ours counts.
    for uid, name in (("someone-else", "x1"), (job["metadata"]["uid"], "x2")):
        cluster.put(
            {
                "kind": "Event",
                "metadata": {"name": name, "namespace": NAMESPACE},
                "involvedObject": {"kind": "Job", "name": "a-trainer", "uid": uid},
                "reason": "FailedCreate",
                "type": "Warning",
                "message": f'pods "a-trainer-1" is forbidden: exceeded quota: gpu ({uid})',
            }
        )
    # The Event changes nothing the operator watches: the recheck the Created pass asked for finds it.
    assert handlers.queue_of(runtime(memo)).delayed() == 1
    fire(memo)
    assert cluster.calls["list_failed_create_events"] == 1  # a Job without a pod: its Events are read
    assert conditions(cluster)["Stalled"] == ("True", "PodCreationRefused")
    assert conditions(cluster)["Reconciling"][0] == "False"
    message = status(cluster)["message"]
    assert "exceeded quota: gpu (" + job["metadata"]["uid"] in message and "someone-else" not in message

    calls = cluster.calls["list_failed_create_events"]
    child_event(memo, job_pod(cluster, phase="Running", running_since=now_rfc3339(), ip="10.0.0.9"))
    assert conditions(cluster)["Stalled"] == ("False", "Progressing")
    assert conditions(cluster)["Running"] == ("True", "TrainerStarting")
    assert cluster.calls["list_failed_create_events"] == calls  # a pod exists: no Event reads


def test_the_validation_pod_comes_first_and_its_verdict_decides_the_gpu_job(
    cluster: FakeCluster, memo: kopf.Memo
) -> None:
    """The one road: create -> <name>-validate only; its pod reports the plan -> the trainer Job is created,
    with the plan and DataValid in status; its pods never count as trainer pods."""
    cluster.put(make_job(validation_pod=True))
    fire(memo)
    validate = cluster.get("Job", NAMESPACE, "a-validate")
    assert validate is not None and cluster.get("Job", NAMESPACE, "a-trainer") is None
    assert status(cluster)["phase"] == "Pending" and "trainerJob" not in status(cluster)
    validated = contract.TerminationSummary(
        outcome="Succeeded",
        reason="Validated",
        message="48 train examples",
        plan={"strategy": "Single", "worldSize": 1, "steps": 4, "examples": {"train": 48, "validation": 0}},
    ).to_json()
    pod = make_pod(name="a-validate-x", phase="Succeeded", terminated=terminated(0, validated))
    pod["metadata"]["ownerReferences"][0].update(name="a-validate", uid=validate["metadata"]["uid"])
    cluster.put(pod)
    validate["status"] = {"succeeded": 1, "conditions": [job_condition("Complete")]}
    child_event(memo, validate)
    assert cluster.get("Job", NAMESPACE, "a-trainer") is not None
    written = status(cluster)
    assert (
        written["plan"]["examples"] == {"train": 48, "validation": 0} and written["trainerJob"] == "a-trainer"
    )
    validated_condition = next(c for c in written["conditions"] if c["type"] == "Validated")
    assert (validated_condition["status"], validated_condition["reason"]) == ("True", "DataValid")
    assert written["phase"] == "Pending"  # the trainer Job has no pod yet; the validation pod is not one


def test_a_failed_validation_pod_ends_the_job_and_no_trainer_job_appears(
    cluster: FakeCluster, memo: kopf.Memo
) -> None:
    cluster.put(make_job(validation_pod=True))
    fire(memo)
    validate = cluster.get("Job", NAMESPACE, "a-validate")
    assert validate is not None
    report = failure_summary("InvalidDataset", "s3://datasets/support/train.jsonl: train.jsonl:7 is not JSON")
    pod = make_pod(name="a-validate-x", phase="Failed", terminated=terminated(2, report))
    pod["metadata"]["ownerReferences"][0].update(name="a-validate", uid=validate["metadata"]["uid"])
    cluster.put(pod)
    validate["status"] = {"failed": 1, "conditions": [job_condition("Failed", "PodFailurePolicy")]}
    child_event(memo, validate)
    fire(memo)  # a later pass (an update, a resume) changes nothing
    assert cluster.get("Job", NAMESPACE, "a-trainer") is None and cluster.calls["create:Job"] == 1
    written = status(cluster)
    assert written["phase"] == "Failed" and "train.jsonl:7" in written["message"]

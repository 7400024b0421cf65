"""kopf handlers: each one is a few lines that funnel into ``sync()``, the single reconcile path.

Three roads lead there: kopf's create/update/resume handlers call it on kopf's thread pool; trainer Job and
pod events queue their FineTuneJob in the ``WorkQueue`` (deduplicated, worked by its own threads); the
``ScrapeLoop`` calls it with ``scrape=True`` for each running job, once per interval.

``sync()`` reads the FineTuneJob and its children through the injected ``ClusterIO``, calls the pure
``reconcile()``, creates what is missing, patches the trainer Job's spec fields that follow edits (suspend,
backoffLimit, activeDeadlineSeconds, ttlSecondsAfterFinished), writes the status once (only when it changed)
and posts an Event per condition transition and per spec edit applied or not applicable. Handlers never
return values (kopf would store them under ``status``) and keep kopf's own bookkeeping in ``kubetune.io/``
annotations.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException

from kubetune_operator import conditions as cond
from kubetune_operator import kueue, labels, observed, termination
from kubetune_operator.builders import is_multi_node
from kubetune_operator.config import OperatorConfig
from kubetune_operator.k8s_io import (
    ClusterIO,
    Forbidden,
    KubeIO,
    Rejected,
    connection_info,
    load_api_client,
)
from kubetune_operator.leader import LeaderElector
from kubetune_operator.models import FineTuneJob, FineTuneJobStatus, JobKey
from kubetune_operator.observed import (
    Obj,
    Observed,
    controller_uid,
    scrape_target,
)
from kubetune_operator.operator_metrics import OperatorMetrics
from kubetune_operator.reconcile import Outcome, is_finished, reconcile
from kubetune_operator.scraping import ScrapeLoop
from kubetune_operator.trainer_metrics import MetricsParseError, parse_trainer_metrics
from kubetune_operator.workqueue import WorkQueue, backoff_seconds
from kubetune_trainer import contract

RETRY_DELAY_SECONDS = 10
SCRAPE_LOGGER = logging.getLogger("kubetune_operator.scraping")
RECONCILE_LOGGER = logging.getLogger("kubetune_operator.reconcile")
HANDLER_THREADS = 16
"""kopf's thread pool, which runs the create, update and resume handlers."""
RECONCILE_THREADS = 8
"""The work queue's threads, which reconcile FineTuneJobs on behalf of child events."""
WATCH_SERVER_TIMEOUT_SECONDS = 300
"""Ask the API server to end each watch after this long, so a silently dropped connection is noticed."""
WATCH_CLIENT_TIMEOUT_SECONDS = 330
API_REQUEST_TIMEOUT_SECONDS = 30


class _KeyedLocks:
    """One lock per FineTuneJob: a FineTuneJob event, its Job's and its pods' events never reconcile the same
    job at the same time (they would race on creating children and on writing status).

    Passes are coalesced: while one pass already waits for a job's lock, another request for that job
    returns at once. The waiting pass reads the cluster after the newer request's event happened, so it
    sees everything that event reported; a burst of events (a pod's ADDED, scheduled, running; its Job's
    active and ready) costs one or two passes instead of one each. The one thing the cluster may no longer
    show is an ended pod that arrived only in an event, so a covered request hands those to the waiting
    pass."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[JobKey, threading.Lock] = {}
        self._waiting: dict[JobKey, dict[str, Obj]] = {}
        """Jobs whose lock a pass waits for, with the ended pods (by uid) handed to that pass."""

    @contextmanager
    def hold(self, key: JobKey, event_pods: list[Obj]) -> Iterator[list[Obj] | None]:
        """Yield the event pods the pass must see, holding the job's lock; or None (holding nothing) when a
        waiting pass covers this request and has taken its ``event_pods``."""
        with self._guard:
            handed = self._waiting.get(key)
            if handed is None:
                handed = self._waiting[key] = {}
                lock = self._locks.setdefault(key, threading.Lock())
                covered = False
            else:
                covered = True
            for pod in event_pods:
                handed[str((pod.get("metadata") or {}).get("uid") or "")] = pod
        if covered:
            yield None
            return
        with lock:
            with self._guard:
                pods = list(self._waiting.pop(key).values())
            yield pods

    def drop(self, key: JobKey) -> None:
        with self._guard:
            self._locks.pop(key, None)


@dataclass
class Runtime:
    """What every handler needs, passed through kopf's memo."""

    config: OperatorConfig
    metrics: OperatorMetrics
    io: ClusterIO | None = None
    """Created by the startup hook unless injected (tests inject a fake)."""
    leader: LeaderElector | None = None
    """The leader election among replicas; None when this replica runs alone. A replica that does not hold
    the Lease reads and writes nothing (see leader.py)."""
    locks: _KeyedLocks = field(default_factory=_KeyedLocks)
    scraper: ScrapeLoop | None = None
    """Reads running trainers' metrics; created and started by the startup hook."""
    queue: WorkQueue | None = None
    """Passes requested by child events; created by the startup hook."""


def runtime_of(memo: Any) -> Runtime:
    runtime = getattr(memo, "runtime", None)
    if not isinstance(runtime, Runtime):
        raise RuntimeError("the operator's memo carries no Runtime; start it with kubetune_operator.__main__")
    return runtime


# --- the one reconcile path -------------------------------------------------------------------------------


def sync(
    runtime: Runtime,
    namespace: str,
    name: str,
    *,
    scrape: bool,
    logger: logging.Logger | Any,
    event_pods: list[Obj] | None = None,
) -> None:
    """``event_pods``: ended trainer pods as their watch events carried them (with_finished_event_pods).

    A failed pass is counted here, once for every road in; each caller decides what the failure means for
    it (kopf retries, the work queue retries, the scrape loop waits for its next round)."""
    io = runtime.io
    if io is None:
        raise RuntimeError("no API client: the startup hook has not run")
    if not is_active(runtime):
        return
    with runtime.metrics.errors_counted(), runtime.locks.hold((namespace, name), event_pods or []) as pods:
        if pods is None:
            return
        body = io.get_finetunejob(namespace, name)
        if body is None:
            runtime.metrics.forget(namespace, name)
            _track(runtime, namespace, name, running=False)
            release_results(io, namespace, name, running_uid=None)
            return
        job = FineTuneJob.from_body(body)
        if job.metadata.deletion_timestamp:
            _track(runtime, namespace, name, running=False)
            return
        seen = observe(io, job, scrape=scrape, logger=logger, event_pods=pods)
        outcome = reconcile(job, seen, runtime.config)
        outcome = _apply_children(io, job, seen, outcome, runtime.config)
        if outcome.set_suspend is not None:
            io.patch_job_suspend(namespace, labels.trainer_job_name(name), outcome.set_suspend)
        if outcome.delete_pod is not None:
            io.delete_pod(outcome.delete_pod)
        if outcome.job_spec_patch:
            io.patch_job_spec(namespace, labels.trainer_job_name(name), outcome.job_spec_patch)
        if outcome.status_changed(job.status):
            io.patch_status(namespace, name, status_patch(job.status, outcome.status))
            runtime.metrics.status_writes.inc()
        if is_finished(outcome.status):
            if labels.ANNOTATION_RESULT_RECORDED not in job.metadata.annotations:
                release_results(io, namespace, name, running_uid=None)
                io.annotate_finetunejob(namespace, name, {labels.ANNOTATION_RESULT_RECORDED: "true"})
        elif seen.trainer_job is not None and controller_uid(seen.trainer_job) != job.metadata.uid:
            release_results(io, namespace, name, running_uid=job.metadata.uid)  # an earlier run's, in the way
        else:
            for pod in termination.releasable_pods(seen.pods, finished=False):
                io.remove_finalizer("Pod", pod, labels.RESULT_FINALIZER)
        _post_events(io, job, outcome, logger)
        runtime.metrics.record(namespace, name, job.metadata.creation_timestamp, job.status, outcome.status)
        _track(runtime, namespace, name, running=outcome.status.phase == "Running")
        if outcome.recheck_after_seconds is not None and runtime.queue is not None:
            runtime.queue.add_after((namespace, name), outcome.recheck_after_seconds)


def is_active(runtime: Runtime) -> bool:
    """This replica may reconcile: it runs alone or holds the leader Lease."""
    return runtime.leader is None or runtime.leader.is_leader()


def stop_work(runtime: Runtime) -> None:
    """Stop the scrape loop and the work queue (the operator is stopping, or this replica lost the Lease):
    no new pass starts, and a pass under way that has not written yet finds ``is_active`` False."""
    if runtime.scraper is not None:
        runtime.scraper.stop()
    if runtime.queue is not None:
        runtime.queue.close()


def release_results(io: ClusterIO, namespace: str, name: str, *, running_uid: str | None) -> None:
    """Remove RESULT_FINALIZER from the trainer Job and pods of FineTuneJob ``name`` once nothing needs
    their result: the FineTuneJob is gone or its outcome is in status. ``running_uid``: the FineTuneJob of
    that name whose run is under way; its own Job and pods keep holding (only an earlier run's are let go)."""
    trainer_job = io.get_job(namespace, labels.trainer_job_name(name))
    held_job_uid = None
    if trainer_job is not None and running_uid and controller_uid(trainer_job) == running_uid:
        held_job_uid = (trainer_job.get("metadata") or {}).get("uid")
    for pod in io.list_pods(namespace, {labels.LABEL_JOB_NAME: name}):
        if held_job_uid is None or controller_uid(pod) != held_job_uid:
            io.remove_finalizer("Pod", pod, labels.RESULT_FINALIZER)
    if trainer_job is not None and held_job_uid is None:
        io.remove_finalizer("Job", trainer_job, labels.RESULT_FINALIZER)


def _track(runtime: Runtime, namespace: str, name: str, *, running: bool) -> None:
    if runtime.scraper is not None:
        runtime.scraper.track(namespace, name, running)


def observe(
    io: ClusterIO,
    job: FineTuneJob,
    *,
    scrape: bool,
    logger: logging.Logger | Any,
    event_pods: list[Obj] | None = None,
) -> Observed:
    if is_finished(job.status):  # reconcile() never looks at a finished job's children again
        return Observed(None, None, (), datetime.now(UTC))
    config_map = io.get_config_map(job.namespace, labels.config_map_name(job.name))
    service = None
    if job.spec is not None and is_multi_node(job):
        service = io.get_service(job.namespace, labels.trainer_service_name(job.name))
    trainer_job = io.get_job(job.namespace, labels.trainer_job_name(job.name))
    pods: tuple[Obj, ...] = ()
    if trainer_job is not None:
        uid = (trainer_job.get("metadata") or {}).get("uid")
        listed = io.list_pods(job.namespace, {labels.LABEL_JOB_NAME: job.name})
        every = observed.with_finished_event_pods(listed, event_pods)
        pods = tuple(pod for pod in every if observed.owned_by(pod, uid))
    validate_job: Obj | None = None
    validate_pods: tuple[Obj, ...] = ()
    validates = job.spec is not None and not job.spec.validation.skip
    if validates and trainer_job is None and not job.status.trainer_job:
        validate_job = io.get_job(job.namespace, labels.validate_job_name(job.name))
        if validate_job is not None:
            uid = (validate_job.get("metadata") or {}).get("uid")
            listed = io.list_pods(job.namespace, {labels.LABEL_JOB_NAME: job.name})
            every = observed.with_finished_event_pods(listed, event_pods)
            validate_pods = tuple(pod for pod in every if uid and observed.owned_by(pod, uid))
    job_events: tuple[Obj, ...] = ()
    if trainer_job is not None and observed.may_have_refused_pods(trainer_job, pods):
        job_events = tuple(io.list_failed_create_events(job.namespace, str(trainer_job["metadata"]["uid"])))
    workload, kueue_unavailable = _read_workload(io, job, trainer_job)
    sample = None
    target = scrape_target(job.name, job.metadata.uid, trainer_job, pods) if scrape else None
    if target is not None:
        pod, ip = target
        try:
            sample = parse_trainer_metrics(io.scrape(ip, contract.METRICS_PORT))
        except (OSError, MetricsParseError) as exc:
            logger.info("could not read trainer metrics from pod %s (%s): %s", pod, ip, exc)
    return Observed(
        config_map,
        trainer_job,
        pods,
        datetime.now(UTC),
        sample,
        job_events=job_events,
        workload=workload,
        kueue_unavailable=kueue_unavailable,
        service=service,
        validate_job=validate_job,
        validate_pods=validate_pods,
    )


def _read_workload(
    io: ClusterIO, job: FineTuneJob, trainer_job: Obj | None
) -> tuple[kueue.WorkloadState | None, str | None]:
    """Kueue's Workload for a queued trainer Job of this FineTuneJob: read while the Job waits for admission,
    and once more on the pass that sees it admitted (for the ClusterQueue's name). Never otherwise: a
    running or finished job costs no Workload list."""
    if job.spec is None or not job.spec.queue_name or job.spec.suspend or trainer_job is None:
        return None, None
    if controller_uid(trainer_job) != job.metadata.uid:
        return None, None
    was = cond.find(job.status.conditions, cond.SUSPENDED)
    just_admitted = was is not None and was.status == cond.TRUE and was.reason == cond.Reason.QUEUED
    if not observed.job_suspended(trainer_job) and not just_admitted:
        return None, None
    job_uid = str((trainer_job.get("metadata") or {}).get("uid") or "")
    try:
        workloads = io.list_workloads(job.namespace, job_uid)
    except kueue.KueueUnavailable as exc:
        return None, str(exc)
    return kueue.workload_for_job(workloads, job_uid), None


def _apply_children(
    io: ClusterIO, job: FineTuneJob, seen: Observed, outcome: Outcome, config: OperatorConfig
) -> Outcome:
    for obj in outcome.replace:
        io.replace(obj)
    for obj in outcome.create:
        try:
            io.create(obj)
        except Rejected as exc:
            rejected = f"{obj['kind']} {obj['metadata']['name']}: {exc}"
            return reconcile(job, replace(seen, rejected=rejected), config)
        except Forbidden as exc:
            forbidden = f"{obj['kind']} {obj['metadata']['name']}: {exc}"
            return reconcile(job, replace(seen, forbidden=forbidden), config)
    return outcome


def status_patch(old: FineTuneJobStatus, new: FineTuneJobStatus) -> Obj:
    """A JSON merge patch turning ``old`` into ``new``: the whole new status, and null for dropped keys."""
    before, after = old.to_dict(), new.to_dict()
    patch: Obj = dict(after)
    for key in before:
        if key not in after:
            patch[key] = None
    return patch


def _post_events(io: ClusterIO, job: FineTuneJob, outcome: Outcome, logger: logging.Logger | Any) -> None:
    involved = {
        "apiVersion": labels.API_VERSION,
        "kind": labels.KIND,
        "name": job.name,
        "namespace": job.namespace,
        "uid": job.metadata.uid,
    }
    for event in outcome.events:
        try:
            io.post_event(involved, event.type, event.reason, event.message)
        except (ApiException, OSError) as exc:  # an Event is a courtesy; the status already says it
            logger.warning("could not post event %s: %s", event.reason, exc)


def _run(
    memo: Any, namespace: str | None, name: str | None, *, scrape: bool, logger: Any, retry: int = 0
) -> None:
    if not namespace or not name:
        return
    try:
        sync(runtime_of(memo), namespace, name, scrape=scrape, logger=logger)
    except (ApiException, OSError) as exc:
        delay = backoff_seconds(RETRY_DELAY_SECONDS, retry + 1)
        raise kopf.TemporaryError(f"reconciling {namespace}/{name} failed: {exc}", delay=delay) from exc


# --- handlers ---------------------------------------------------------------------------------------------


def on_finetunejob(
    name: str | None, namespace: str | None, memo: Any, logger: Any, retry: int = 0, **_: Any
) -> None:
    """resume / create / update of spec. ``retry``: kopf's count of failed tries of this change."""
    _run(memo, namespace, name, scrape=False, logger=logger, retry=retry)


def scrape_job(runtime: Runtime, namespace: str, name: str) -> None:
    """The scrape loop's pass over one running job: its trainer's metrics into status.progress/metrics."""
    try:
        sync(runtime, namespace, name, scrape=True, logger=SCRAPE_LOGGER)
    except (ApiException, OSError) as exc:  # the next round tries again
        SCRAPE_LOGGER.warning("reconciling %s/%s while scraping failed: %s", namespace, name, exc)


async def on_child_event(body: Any, namespace: str | None, memo: Any, **_: Any) -> None:
    """A trainer Job or pod changed: queue a pass over the FineTuneJob named in its kubetune.io/job-name
    label. Async and instant on purpose: see workqueue.py."""
    owner = ((body.get("metadata") or {}).get("labels") or {}).get(labels.LABEL_JOB_NAME)
    if not namespace or not owner:
        return
    finished_pod = dict(body) if body.get("kind") == "Pod" and observed.is_finished_pod(body) else None
    finished_job = body.get("kind") == "Job" and observed.is_finished_job(body)
    queue_of(runtime_of(memo)).add((namespace, owner), finished_pod, urgent=finished_job)


def queue_of(runtime: Runtime) -> WorkQueue:
    if runtime.queue is None:
        raise RuntimeError("no work queue: the startup hook has not run")
    return runtime.queue


def start_queue(runtime: Runtime, threads: int = RECONCILE_THREADS) -> WorkQueue:
    """The queue of passes requested by child events, worked by ``threads`` threads."""

    def work(key: JobKey, finished_pods: list[Obj]) -> None:
        sync(runtime, key[0], key[1], scrape=False, logger=RECONCILE_LOGGER, event_pods=finished_pods)

    runtime.queue = WorkQueue(
        work, threads=threads, retry_delay_seconds=RETRY_DELAY_SECONDS, logger=RECONCILE_LOGGER
    )
    runtime.metrics.watch_queue_depth(runtime.queue.depth)
    return runtime.queue


async def on_finetunejob_deleted(
    name: str | None, namespace: str | None, memo: Any, type: str | None = None, **_: Any
) -> None:
    """A FineTuneJob is gone (watch event DELETED; there is no finalizer to wait for): its children go with
    the owner reference once a queued pass has removed their RESULT_FINALIZER, and here its metric series,
    scrape entry and lock are dropped.

    Async on purpose: it sees every FineTuneJob event and does no I/O, so it should not take a turn on the
    thread pool that the reconcile passes wait for."""
    if type == "DELETED" and name and namespace:
        runtime = runtime_of(memo)
        runtime.metrics.forget(namespace, name)
        _track(runtime, namespace, name, running=False)
        runtime.locks.drop((namespace, name))
        queue_of(runtime).add((namespace, name))  # its children's results are no longer needed: let go


def on_startup(settings: kopf.OperatorSettings, memo: Any, logger: Any, **_: Any) -> None:
    """The one place kopf is configured."""
    runtime = runtime_of(memo)
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=labels.ANNOTATION_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=labels.ANNOTATION_PREFIX, key="last-handled-configuration"
    )
    settings.persistence.finalizer = labels.FINALIZER
    settings.watching.server_timeout = WATCH_SERVER_TIMEOUT_SECONDS
    settings.watching.client_timeout = WATCH_CLIENT_TIMEOUT_SECONDS
    settings.watching.connect_timeout = 10
    # The API server filters the children's watches: the handlers' label filter alone is applied by kopf
    # on its side, after every Job and pod of the watched namespaces (the cluster, in cluster-wide mode)
    # has been streamed to the operator.
    for group, version, plural in CHILD_RESOURCES:
        settings.watching.label_selectors[group, version, plural] = labels.LABEL_JOB_NAME
    settings.networking.request_timeout = API_REQUEST_TIMEOUT_SECONDS
    settings.networking.connect_timeout = 10
    # The create/update/resume passes run on kopf's thread pool; they mostly wait on the API server, so a
    # burst of new FineTuneJobs needs more of them in flight than the default (cores + 4).
    settings.execution.max_workers = HANDLER_THREADS
    # Transitions are posted as Events by sync(); kopf adds only its own warnings and errors.
    settings.posting.level = logging.WARNING
    # Replicas elect the active one through a Lease before kopf starts (leader.py), so kopf never peers.
    settings.peering.standalone = True
    if runtime.io is None:
        runtime.io = KubeIO(load_api_client(), runtime.config)
    if runtime.queue is None:
        start_queue(runtime)
    if runtime.scraper is None:
        runtime.scraper = ScrapeLoop(
            runtime.config.scrape_interval_seconds,
            lambda ns, name: scrape_job(runtime, ns, name),
            concurrency=runtime.config.scrape_concurrency,
            on_round=runtime.metrics.scrape_round_duration.observe,
        )
    runtime.scraper.start()
    logger.info(
        "kubetune operator configured: trainer image %s, scrape interval %ss (%s at a time, %ss each at "
        "most), %s",
        runtime.config.trainer_image,
        runtime.config.scrape_interval_seconds,
        runtime.config.scrape_concurrency,
        runtime.config.scrape_timeout_seconds,
        f"leader as {runtime.leader.identity}" if runtime.leader else "standalone",
    )


def on_cleanup(memo: Any, **_: Any) -> None:
    """The operator is stopping: end the scrape loop and the reconcile threads, then hand the leader Lease
    back so a standby replica takes over at once."""
    runtime = runtime_of(memo)
    stop_work(runtime)
    if runtime.leader is not None:
        runtime.leader.release()


def on_login(settings: kopf.OperatorSettings, **_: Any) -> kopf.ConnectionInfo:
    """kopf's own connection: $KUBECONFIG or ~/.kube/config when present, the service account otherwise.
    (A login handler must return its credentials; it stores nothing on any object.)"""
    return connection_info(load_api_client(), trust_env=settings.networking.trust_env)


CHILD_RESOURCES = (("batch", "v1", "jobs"), ("", "v1", "pods"))
"""The children kopf watches (for on_child_event), only those carrying the kubetune.io/job-name label."""


def register_handlers(registry: kopf.OperatorRegistry) -> None:
    """Attach every handler to ``registry``. Handlers read the operator's settings from the Runtime in
    kopf's memo, so no registration depends on them."""
    ftj = (labels.GROUP, labels.VERSION, labels.PLURAL)
    kopf.on.startup(registry=registry)(on_startup)
    kopf.on.cleanup(registry=registry)(on_cleanup)
    kopf.on.login(registry=registry)(on_login)
    kopf.on.resume(*ftj, registry=registry)(on_finetunejob)
    kopf.on.create(*ftj, registry=registry)(on_finetunejob)
    kopf.on.update(*ftj, field="spec", registry=registry)(on_finetunejob)
    kopf.on.event(*ftj, registry=registry, id="finetunejob-deleted")(on_finetunejob_deleted)
    child_filter = {labels.LABEL_JOB_NAME: kopf.PRESENT}
    for (group, version, plural), id_ in zip(CHILD_RESOURCES, ("trainer-job", "trainer-pod"), strict=True):
        kopf.on.event(group, version, plural, labels=child_filter, registry=registry, id=id_)(on_child_event)

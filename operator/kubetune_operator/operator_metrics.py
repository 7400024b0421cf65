"""The operator's own Prometheus metrics, served on their own port (default 8000).

Jobs by phase and the per-job training gauges are computed from what the operator last wrote to each
FineTuneJob's status, so a deleted job's series disappear with ``forget()``, and a finished job's per-job
series disappear ``retention_seconds`` after it finished (a cluster that keeps finished FineTuneJobs for
months would otherwise expose three series per job forever).

Names follow the Prometheus conventions: counters end in ``_total``, durations are in ``_seconds``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from kubetune_operator.conditions import parse_rfc3339
from kubetune_operator.config import DEFAULT_FINISHED_SERIES_RETENTION_SECONDS
from kubetune_operator.models import FineTuneJobStatus

PHASES = ("Pending", "Running", "Suspended", "Succeeded", "Failed")
START_BUCKETS = (1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600)
DURATION_BUCKETS = (60, 300, 600, 1800, 3600, 7200, 14400, 28800, 86400, 172800, 604800)
SCRAPE_ROUND_BUCKETS = (1, 2, 5, 10, 15, 20, 30, 45, 60, 120, 300, 600)
FINISHED_PHASES = ("Succeeded", "Failed")


@dataclass(frozen=True)
class _Training:
    step: float | None
    loss: float | None
    tokens_per_second: float | None


class OperatorMetrics(Collector):
    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        retention_seconds: float = DEFAULT_FINISHED_SERIES_RETENTION_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.retention_seconds = retention_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._phases: dict[tuple[str, str], str] = {}
        self._training: dict[tuple[str, str], _Training] = {}
        self._finished_at: dict[tuple[str, str], float] = {}
        """Finished jobs: when they finished (seconds since the epoch), for the retention of their series."""
        self.time_to_start = Histogram(
            "kubetune_operator_time_to_trainer_start_seconds",
            "Seconds from a FineTuneJob's creation to its trainer container starting.",
            buckets=START_BUCKETS,
            registry=self.registry,
        )
        self.duration = Histogram(
            "kubetune_operator_job_duration_seconds",
            "Seconds from a FineTuneJob's creation to it finishing, by outcome.",
            ["outcome"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.reconcile_errors = Counter(
            "kubetune_operator_reconcile_errors_total",
            "Reconcile passes that raised, by the kind of error.",
            ["error"],
            registry=self.registry,
        )
        self.scrape_round_duration = Histogram(
            "kubetune_operator_scrape_round_duration_seconds",
            "Seconds one round of the scrape loop took to read every running trainer once. The loop spreads "
            "a round over the scrape interval, so rounds longer than the interval mean it cannot keep up.",
            buckets=SCRAPE_ROUND_BUCKETS,
            registry=self.registry,
        )
        self.workqueue_depth = Gauge(
            "kubetune_operator_workqueue_depth",
            "FineTuneJobs waiting in the work queue for a reconcile pass requested by a child event.",
            registry=self.registry,
        )
        self.status_writes = Counter(
            "kubetune_operator_status_writes_total",
            "FineTuneJob status writes this replica made (only the active replica writes).",
            registry=self.registry,
        )
        self.leader = Gauge(
            "kubetune_operator_leader",
            "1 while this replica is the active one (holds the leader Lease, or runs alone), 0 on standby.",
            registry=self.registry,
        )
        self.leader.set(1)
        self.registry.register(self)

    def watch_leader(self, is_leader: Callable[[], bool]) -> None:
        """Read whether this replica leads at every collection."""
        self.leader.set_function(lambda: 1.0 if is_leader() else 0.0)

    def watch_queue_depth(self, depth: Callable[[], int]) -> None:
        """Read the work queue's depth at every collection."""
        self.workqueue_depth.set_function(lambda: float(depth()))

    def record(
        self, namespace: str, name: str, created: str | None, old: FineTuneJobStatus, new: FineTuneJobStatus
    ) -> None:
        """Take in a status the operator just wrote; observe start and finish once, at their transition."""
        key = (namespace, name)
        created_at = parse_rfc3339(created)
        if created_at is not None and old.start_time is None and new.start_time is not None:
            started_at = parse_rfc3339(new.start_time)
            if started_at is not None:
                self.time_to_start.observe(max(0.0, (started_at - created_at).total_seconds()))
        if created_at is not None and old.completion_time is None and new.completion_time is not None:
            finished_at = parse_rfc3339(new.completion_time)
            if finished_at is not None and new.phase in ("Succeeded", "Failed"):
                self.duration.labels(outcome=new.phase).observe(
                    max(0.0, (finished_at - created_at).total_seconds())
                )
        with self._lock:
            if new.phase:
                self._phases[key] = new.phase
            if new.phase in FINISHED_PHASES and key not in self._finished_at:
                finished_at = parse_rfc3339(new.completion_time)
                self._finished_at[key] = finished_at.timestamp() if finished_at else self._clock()
            progress, metrics = new.progress, new.metrics
            if progress is not None or metrics is not None:
                self._training[key] = _Training(
                    step=float(progress.step) if progress and progress.step is not None else None,
                    loss=metrics.train_loss if metrics else None,
                    tokens_per_second=progress.tokens_per_second if progress else None,
                )

    @contextmanager
    def errors_counted(self) -> Iterator[None]:
        """Count an exception raised inside by its type, and let it through."""
        try:
            yield
        except Exception as exc:
            self.reconcile_errors.labels(error=type(exc).__name__).inc()
            raise

    def forget(self, namespace: str, name: str) -> None:
        with self._lock:
            self._phases.pop((namespace, name), None)
            self._training.pop((namespace, name), None)
            self._finished_at.pop((namespace, name), None)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self._lock:
            expired = self._clock() - self.retention_seconds
            for key, finished_at in self._finished_at.items():
                if finished_at <= expired:
                    self._training.pop(key, None)
            phases = dict(self._phases)
            training = dict(self._training)
        by_phase = GaugeMetricFamily(
            "kubetune_operator_finetunejobs",
            "FineTuneJobs known to the operator, by phase.",
            labels=["phase"],
        )
        for phase in PHASES:
            by_phase.add_metric([phase], sum(1 for p in phases.values() if p == phase))
        yield by_phase
        families = {
            "step": GaugeMetricFamily(
                "kubetune_finetunejob_step",
                "Latest optimizer step of a FineTuneJob.",
                labels=["namespace", "name"],
            ),
            "loss": GaugeMetricFamily(
                "kubetune_finetunejob_train_loss",
                "Latest training loss of a FineTuneJob.",
                labels=["namespace", "name"],
            ),
            "tokens_per_second": GaugeMetricFamily(
                "kubetune_finetunejob_tokens_per_second",
                "Latest training throughput of a FineTuneJob, in tokens per second.",
                labels=["namespace", "name"],
            ),
        }
        for (namespace, name), sample in sorted(training.items()):
            for attr, family in families.items():
                value = getattr(sample, attr)
                if value is not None:
                    family.add_metric([namespace, name], value)
        yield from families.values()


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> WSGIServer:
    """Serve /metrics from a background thread; returns the server (``shutdown()`` stops it)."""
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server

"""Operator-wide settings, read once from the environment at start-up."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

DEFAULT_TRAINER_IMAGE = "kubetune/trainer:0.1.0"
DEFAULT_GPU_RESOURCE_NAME = "nvidia.com/gpu"
DEFAULT_SCRAPE_INTERVAL_SECONDS = 10.0
DEFAULT_SCRAPE_TIMEOUT_SECONDS = 2.0
DEFAULT_SCRAPE_CONCURRENCY = 8
DEFAULT_FINISHED_SERIES_RETENTION_SECONDS = 3600.0

ENV_TRAINER_IMAGE = "KUBETUNE_TRAINER_IMAGE"
ENV_DEFAULT_S3_ENDPOINT = "KUBETUNE_DEFAULT_S3_ENDPOINT"
ENV_GPU_RESOURCE_NAME = "KUBETUNE_GPU_RESOURCE_NAME"
ENV_SCRAPE_INTERVAL = "KUBETUNE_SCRAPE_INTERVAL_SECONDS"
ENV_SCRAPE_TIMEOUT = "KUBETUNE_SCRAPE_TIMEOUT_SECONDS"
ENV_SCRAPE_CONCURRENCY = "KUBETUNE_SCRAPE_CONCURRENCY"
ENV_FINISHED_SERIES_RETENTION = "KUBETUNE_FINISHED_SERIES_RETENTION_SECONDS"
ENV_TRAINER_POD_DEFAULTS = "KUBETUNE_TRAINER_POD_DEFAULTS"
ENV_VALIDATION_CPU = "KUBETUNE_VALIDATION_CPU"
ENV_VALIDATION_MEMORY = "KUBETUNE_VALIDATION_MEMORY"
ENV_VALIDATION_QUEUE_NAME = "KUBETUNE_VALIDATION_QUEUE_NAME"
ENV_DEFAULT_GPU_PRODUCT = "KUBETUNE_DEFAULT_GPU_PRODUCT"
DEFAULT_VALIDATION_CPU = "1"
DEFAULT_VALIDATION_MEMORY = "4Gi"
DEFAULT_GPU_PRODUCT = "NVIDIA-H100-80GB-HBM3"
DEFAULT_TERMINATION_GRACE_PERIOD_SECONDS = 300
"""Long enough for a trainer stopped by SIGTERM to write and upload a checkpoint of a large model."""


class ConfigError(ValueError):
    """An operator setting has a value the operator cannot use."""


@dataclass(frozen=True)
class TrainerPodDefaults:
    """Pod settings for every trainer, from the chart's trainer.podDefaults; a FineTuneJob's own
    spec.trainer / spec.resources value wins where it sets one."""

    service_account_name: str | None = None
    image_pull_secrets: tuple[dict[str, str], ...] = ()
    runtime_class_name: str | None = None
    termination_grace_period_seconds: int = DEFAULT_TERMINATION_GRACE_PERIOD_SECONDS
    ephemeral_storage: str | None = None
    pod_annotations: dict[str, str] = field(default_factory=dict)
    pod_labels: dict[str, str] = field(default_factory=dict)
    affinity: dict[str, Any] | None = None
    topology_spread_constraints: tuple[dict[str, Any], ...] = ()

    @classmethod
    def from_json(cls, text: str) -> TrainerPodDefaults:
        """Parse the chart's JSON; a wrong key or type stops the operator at start-up, naming it."""
        where = ENV_TRAINER_POD_DEFAULTS
        try:
            data = json.loads(text) if text.strip() else {}
        except json.JSONDecodeError as err:
            hint = "set it from the chart's trainer.podDefaults"
            raise ConfigError(f"{where} is not JSON ({err}); {hint}") from err
        if not isinstance(data, dict):
            raise ConfigError(f'{where} must be a JSON object, e.g. {{"serviceAccountName": "trainer"}}')
        kinds: dict[str, tuple[type, ...]] = {
            "serviceAccountName": (str,),
            "imagePullSecrets": (list,),
            "runtimeClassName": (str,),
            "terminationGracePeriodSeconds": (int,),
            "ephemeralStorage": (str,),
            "podAnnotations": (dict,),
            "podLabels": (dict,),
            "affinity": (dict,),
            "topologySpreadConstraints": (list,),
        }
        for key, value in data.items():
            if key not in kinds:
                raise ConfigError(f"{where}: unknown key {key!r} (known: {', '.join(kinds)})")
            if not isinstance(value, kinds[key]) or isinstance(value, bool):
                wanted, got = kinds[key][0].__name__, type(value).__name__
                raise ConfigError(f"{where}.{key}: expected {wanted}, got {got}")
        grace = data.get("terminationGracePeriodSeconds", DEFAULT_TERMINATION_GRACE_PERIOD_SECONDS)
        return cls(
            service_account_name=data.get("serviceAccountName") or None,
            image_pull_secrets=tuple({"name": str(s["name"])} for s in data.get("imagePullSecrets", [])),
            runtime_class_name=data.get("runtimeClassName") or None,
            termination_grace_period_seconds=int(grace),
            ephemeral_storage=data.get("ephemeralStorage") or None,
            pod_annotations={str(k): str(v) for k, v in data.get("podAnnotations", {}).items()},
            pod_labels={str(k): str(v) for k, v in data.get("podLabels", {}).items()},
            affinity=data.get("affinity") or None,
            topology_spread_constraints=tuple(data.get("topologySpreadConstraints", [])),
        )


@dataclass(frozen=True)
class OperatorConfig:
    trainer_image: str = DEFAULT_TRAINER_IMAGE
    """Image of the trainer container when a FineTuneJob sets no spec.trainer.image."""
    default_s3_endpoint: str | None = None
    """S3 endpoint for FineTuneJobs that set no spec.s3.endpoint (None: AWS)."""
    gpu_resource_name: str = DEFAULT_GPU_RESOURCE_NAME
    """Extended resource requested per GPU when a FineTuneJob sets no spec.resources.gpuResourceName."""
    scrape_interval_seconds: float = DEFAULT_SCRAPE_INTERVAL_SECONDS
    """How often the trainer pod's Prometheus endpoint is read while a job runs."""
    scrape_timeout_seconds: float = DEFAULT_SCRAPE_TIMEOUT_SECONDS
    """The deadline of one whole read of a trainer's /metrics (connect, request, every byte of the answer):
    a pod that answers slowly or never stops holds a scrape slot this long at most."""
    scrape_concurrency: int = DEFAULT_SCRAPE_CONCURRENCY
    """How many trainers are scraped at the same time, at most."""
    finished_series_retention_seconds: float = DEFAULT_FINISHED_SERIES_RETENTION_SECONDS
    """How long a finished FineTuneJob's per-job series (step, loss, tokens/s) stay on the operator's
    /metrics after it finished, so Prometheus records the final values before they go."""
    request_timeout_seconds: float = 15.0
    """Timeout of every API call the operator makes itself."""
    trainer_pod_defaults: TrainerPodDefaults = field(default_factory=TrainerPodDefaults)
    """Pod settings every trainer gets unless its FineTuneJob sets its own."""
    validation_cpu: str = DEFAULT_VALIDATION_CPU
    """CPU request of the validation pod when a FineTuneJob sets no spec.validation.resources.cpu."""
    validation_memory: str = DEFAULT_VALIDATION_MEMORY
    """Memory request and limit of the validation pod (spec.validation.resources.memory overrides it)."""
    validation_queue_name: str | None = None
    """Kueue queue of every validation Job whose FineTuneJob sets no spec.validation.queueName; None: the
    validation Job is not queued (Kueue leaves a Job without a queue label alone), so it runs at once."""
    default_gpu_product: str = DEFAULT_GPU_PRODUCT
    """The GPU product the plan and estimate assume when a job's nodeSelector names none
    (nvidia.com/gpu.product)."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> OperatorConfig:
        env = os.environ if environ is None else environ
        interval = _positive_number(env, ENV_SCRAPE_INTERVAL, DEFAULT_SCRAPE_INTERVAL_SECONDS, "10")
        timeout = _positive_number(env, ENV_SCRAPE_TIMEOUT, DEFAULT_SCRAPE_TIMEOUT_SECONDS, "2")
        concurrency = _positive_number(
            env, ENV_SCRAPE_CONCURRENCY, DEFAULT_SCRAPE_CONCURRENCY, "8", what="a number of scrapes"
        )
        if concurrency != int(concurrency):
            raw = env.get(ENV_SCRAPE_CONCURRENCY, "").strip()
            raise ConfigError(f"{ENV_SCRAPE_CONCURRENCY}={raw!r} must be a whole number of scrapes, e.g. 8")
        retention = _positive_number(
            env, ENV_FINISHED_SERIES_RETENTION, DEFAULT_FINISHED_SERIES_RETENTION_SECONDS, "3600"
        )
        return cls(
            trainer_image=env.get(ENV_TRAINER_IMAGE, "").strip() or DEFAULT_TRAINER_IMAGE,
            default_s3_endpoint=env.get(ENV_DEFAULT_S3_ENDPOINT, "").strip() or None,
            gpu_resource_name=env.get(ENV_GPU_RESOURCE_NAME, "").strip() or DEFAULT_GPU_RESOURCE_NAME,
            scrape_interval_seconds=interval,
            scrape_timeout_seconds=timeout,
            scrape_concurrency=int(concurrency),
            finished_series_retention_seconds=retention,
            trainer_pod_defaults=TrainerPodDefaults.from_json(env.get(ENV_TRAINER_POD_DEFAULTS, "")),
            validation_cpu=env.get(ENV_VALIDATION_CPU, "").strip() or DEFAULT_VALIDATION_CPU,
            validation_memory=env.get(ENV_VALIDATION_MEMORY, "").strip() or DEFAULT_VALIDATION_MEMORY,
            validation_queue_name=env.get(ENV_VALIDATION_QUEUE_NAME, "").strip() or None,
            default_gpu_product=env.get(ENV_DEFAULT_GPU_PRODUCT, "").strip() or DEFAULT_GPU_PRODUCT,
        )


def _positive_number(
    env: Mapping[str, str], key: str, default: float, example: str, what: str = "a number of seconds"
) -> float:
    raw = env.get(key, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{key}={raw!r} is not {what}; set it to e.g. {example}") from None
    if not value > 0 or value == float("inf"):
        raise ConfigError(f"{key}={raw!r} must be a finite number greater than 0, e.g. {example}")
    return value

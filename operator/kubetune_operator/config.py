"""Operator-wide settings, read once from the environment at start-up."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_TRAINER_IMAGE = "kubetune/trainer:0.1.0"
DEFAULT_GPU_RESOURCE_NAME = "nvidia.com/gpu"
DEFAULT_SCRAPE_INTERVAL_SECONDS = 10.0

ENV_TRAINER_IMAGE = "KUBETUNE_TRAINER_IMAGE"
ENV_DEFAULT_S3_ENDPOINT = "KUBETUNE_DEFAULT_S3_ENDPOINT"
ENV_GPU_RESOURCE_NAME = "KUBETUNE_GPU_RESOURCE_NAME"
ENV_SCRAPE_INTERVAL = "KUBETUNE_SCRAPE_INTERVAL_SECONDS"


class ConfigError(ValueError):
    """An operator setting has a value the operator cannot use."""


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
    scrape_timeout_seconds: float = 2.0
    """How long one read of a trainer's /metrics may take; the scrape loop reads every running trainer from
    one thread, so a hung pod must not hold up the others for long."""
    request_timeout_seconds: float = 15.0
    """Timeout of every API call the operator makes itself."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> OperatorConfig:
        env = os.environ if environ is None else environ
        raw_interval = env.get(ENV_SCRAPE_INTERVAL, "").strip()
        interval = DEFAULT_SCRAPE_INTERVAL_SECONDS
        if raw_interval:
            try:
                interval = float(raw_interval)
            except ValueError:
                raise ConfigError(
                    f"{ENV_SCRAPE_INTERVAL}={raw_interval!r} is not a number of seconds; set it to e.g. 10"
                ) from None
            if interval <= 0:
                raise ConfigError(f"{ENV_SCRAPE_INTERVAL}={raw_interval!r} must be greater than 0")
        return cls(
            trainer_image=env.get(ENV_TRAINER_IMAGE, "").strip() or DEFAULT_TRAINER_IMAGE,
            default_s3_endpoint=env.get(ENV_DEFAULT_S3_ENDPOINT, "").strip() or None,
            gpu_resource_name=env.get(ENV_GPU_RESOURCE_NAME, "").strip() or DEFAULT_GPU_RESOURCE_NAME,
            scrape_interval_seconds=interval,
        )

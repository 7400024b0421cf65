"""Metadata every child of a FineTuneJob carries."""

from __future__ import annotations

from typing import Any

from kubetune_operator import labels
from kubetune_operator.models import FineTuneJob, FineTuneJobSpec


def spec_of(job: FineTuneJob) -> FineTuneJobSpec:
    if job.spec is None:
        raise ValueError(f"FineTuneJob {job.namespace}/{job.name} has no valid spec to build children from")
    return job.spec


def owner_reference(job: FineTuneJob) -> dict[str, Any]:
    """Controller reference: deleting the FineTuneJob garbage-collects the child."""
    return {
        "apiVersion": labels.API_VERSION,
        "kind": labels.KIND,
        "name": job.name,
        "uid": job.metadata.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def child_metadata(job: FineTuneJob, name: str, extra_labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": job.namespace,
        "labels": {**labels.child_labels(job.name), **(extra_labels or {})},
        "ownerReferences": [owner_reference(job)],
    }

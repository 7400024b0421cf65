"""The headless Service of a multi-node job (spec.resources.nodes > 1): it gives the trainer pods their names.

The trainer Job is Indexed and its pods' subdomain is this Service, so the Job controller's hostname
``<name>-trainer-<i>`` makes pod i answer at ``<name>-trainer-<i>.<name>-trainer`` in cluster DNS. Addresses
are published before the pods are ready: the pods must find each other to become ready at all.
"""

from __future__ import annotations

from typing import Any

from kubetune_operator import labels
from kubetune_operator.builders.common import child_metadata, spec_of
from kubetune_operator.models import FineTuneJob


def is_multi_node(job: FineTuneJob) -> bool:
    return spec_of(job).resources.nodes > 1


def build_trainer_service(job: FineTuneJob) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": child_metadata(job, labels.trainer_service_name(job.name)),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": labels.trainer_selector(job.name),
            "ports": [
                {
                    "name": labels.RENDEZVOUS_PORT_NAME,
                    "port": labels.RENDEZVOUS_PORT,
                    "targetPort": labels.RENDEZVOUS_PORT,
                    "protocol": "TCP",
                }
            ],
        },
    }

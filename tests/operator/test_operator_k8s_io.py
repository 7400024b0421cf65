"""KubeIO, the one module that talks to the API server, against a stand-in for the kubernetes ApiClient
that answers each HTTP method with a scripted status: how the server's answers become results and errors."""

from __future__ import annotations

import json
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException
from operator_factories import make_job, parse

from kubetune_operator.builders import build_config_map, build_trainer_job
from kubetune_operator.config import OperatorConfig
from kubetune_operator.k8s_io import Forbidden, KubeIO, Rejected

Obj = dict[str, Any]


class _Response:
    def __init__(self, status: int, body: Obj) -> None:
        self.status = status
        self.reason = "scripted"
        self.headers: dict[str, str] = {}
        self.data = json.dumps(body).encode()

    def read(self) -> bytes:
        return self.data


class ScriptedApiClient:
    def __init__(self, answers: dict[str, tuple[int, Obj]]) -> None:
        self.answers = answers
        self.requests: list[tuple[str, str]] = []
        self.sent: list[tuple[str, Any]] = []
        """(Content-Type, body) of each request."""

    def param_serialize(
        self, *, method: str, resource_path: str, header_params: dict[str, str], body: Any = None, **_: Any
    ) -> tuple[Any, ...]:
        return method, resource_path, header_params, body, None

    def call_api(
        self, method: str, url: str, header_params: dict[str, str], body: Any, **_: Any
    ) -> _Response:
        self.requests.append((method, url))
        self.sent.append((header_params["Content-Type"], body))
        return _Response(*self.answers.get(method, (200, {})))


def kube_io(answers: dict[str, tuple[int, Obj]]) -> tuple[KubeIO, ScriptedApiClient]:
    api = ScriptedApiClient(answers)
    return KubeIO(api, OperatorConfig()), api  # type: ignore[arg-type]


def status(code: int, message: str) -> tuple[int, Obj]:
    return code, {"kind": "Status", "status": "Failure", "code": code, "message": message}


def test_create_tolerates_an_existing_child_without_reading_it() -> None:
    io, api = kube_io({"POST": status(409, 'configmaps "a-config" already exists')})
    io.create(build_config_map(parse(make_job()), OperatorConfig()))
    assert api.requests == [("POST", "/api/v1/namespaces/ml/configmaps")]


def test_a_rejected_child_carries_the_servers_message() -> None:
    message = (
        'Job.batch "a-trainer" is invalid: spec.template.spec.priorityClassName: Invalid value: "Bad_Name"'
    )
    io, _ = kube_io({"POST": status(422, message)})
    with pytest.raises(Rejected) as raised:
        io.create(build_trainer_job(parse(make_job()), OperatorConfig()))
    assert str(raised.value) == message


def test_a_forbidden_child_carries_the_servers_message() -> None:
    message = 'jobs.batch "a-trainer" is forbidden: User "system:serviceaccount:ml:op" cannot create resource'
    io, _ = kube_io({"POST": status(403, message)})
    with pytest.raises(Forbidden) as raised:
        io.create(build_trainer_job(parse(make_job()), OperatorConfig()))
    assert str(raised.value) == message


def test_a_missing_object_reads_as_none_and_other_failures_raise() -> None:
    io, api = kube_io({"GET": status(404, 'jobs.batch "a-trainer" not found')})
    assert io.get_job("ml", "a-trainer") is None
    assert api.requests == [("GET", "/apis/batch/v1/namespaces/ml/jobs/a-trainer")]
    io, _ = kube_io({"GET": status(500, "etcdserver: request timed out")})
    with pytest.raises(ApiException) as raised:
        io.get_finetunejob("ml", "a")
    assert raised.value.status == 500


def test_job_spec_edits_go_out_as_one_merge_patch_of_the_jobs_spec() -> None:
    io, api = kube_io({})
    io.patch_job_spec("ml", "a-trainer", {"backoffLimit": 5, "activeDeadlineSeconds": None})
    assert api.requests == [("PATCH", "/apis/batch/v1/namespaces/ml/jobs/a-trainer")]
    assert api.sent == [
        ("application/merge-patch+json", {"spec": {"backoffLimit": 5, "activeDeadlineSeconds": None}})
    ]

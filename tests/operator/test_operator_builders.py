"""The pure builders against expected manifests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from operator_factories import make_job, parse

from kubetune_operator.builders import build_config_map, build_trainer_job, render_trainer_config
from kubetune_operator.builders.trainer_job import updatable_job_fields
from kubetune_operator.config import ConfigError, OperatorConfig, TrainerPodDefaults
from kubetune_trainer import contract

OWNER = {
    "apiVersion": "kubetune.io/v1alpha1",
    "kind": "FineTuneJob",
    "name": "support-bot",
    "uid": "uid-support-bot",
    "controller": True,
    "blockOwnerDeletion": True,
}
CHILD_LABELS = {"kubetune.io/job-name": "support-bot", "app.kubernetes.io/managed-by": "kubetune"}


def job_for(**kwargs: Any) -> Any:
    return parse(make_job("support-bot", **kwargs))


def test_trainer_job_matches_the_pod_contract(config: OperatorConfig) -> None:
    manifest = build_trainer_job(job_for(), config)
    built_from = json.loads(manifest["metadata"].pop("annotations")["kubetune.io/built-from"])
    assert set(built_from) == {
        "spec.s3",
        "spec.checkpointing",
        "spec.resources",
        "spec.trainer.image",
        "spec.trainer.env",
        "spec.queueName",
        "spec.peerTimeoutSeconds",
    }
    assert manifest == {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": "support-bot-trainer",
            "namespace": "ml",
            "labels": CHILD_LABELS,
            "ownerReferences": [OWNER],
            "finalizers": ["kubetune.io/result"],
        },
        "spec": {
            "suspend": False,
            "backoffLimit": 3,
            "podFailurePolicy": {
                "rules": [
                    {
                        "action": "FailJob",
                        "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [2]},
                    },
                    {
                        "action": "Ignore",
                        "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [143]},
                    },
                    {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
                ]
            },
            "template": {
                "metadata": {
                    "labels": {
                        **CHILD_LABELS,
                        "app.kubernetes.io/name": "kubetune-trainer",
                        "app.kubernetes.io/component": "trainer",
                    },
                    "finalizers": ["kubetune.io/result"],
                },
                "spec": {
                    "restartPolicy": "Never",
                    "terminationGracePeriodSeconds": 300,
                    "automountServiceAccountToken": False,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": 1000,
                        "runAsGroup": 1000,
                        "fsGroup": 1000,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [
                        {
                            "name": "trainer",
                            "image": "registry.example/kubetune/trainer:test",
                            "env": [
                                {"name": "KUBETUNE_CONFIG", "value": "/etc/kubetune/config.json"},
                                {"name": "KUBETUNE_WORK_DIR", "value": "/scratch"},
                                {"name": "HF_HOME", "value": "/scratch/hf"},
                                {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                                {
                                    "name": "AWS_ACCESS_KEY_ID",
                                    "valueFrom": {
                                        "secretKeyRef": {"name": "s3-creds", "key": "AWS_ACCESS_KEY_ID"}
                                    },
                                },
                                {
                                    "name": "AWS_SECRET_ACCESS_KEY",
                                    "valueFrom": {
                                        "secretKeyRef": {"name": "s3-creds", "key": "AWS_SECRET_ACCESS_KEY"}
                                    },
                                },
                                {
                                    "name": "AWS_SESSION_TOKEN",
                                    "valueFrom": {
                                        "secretKeyRef": {
                                            "name": "s3-creds",
                                            "key": "AWS_SESSION_TOKEN",
                                            "optional": True,
                                        }
                                    },
                                },
                                {
                                    "name": "KUBETUNE_SECRET_ENV",
                                    "value": "AWS_ACCESS_KEY_ID,AWS_SECRET_ACCESS_KEY,AWS_SESSION_TOKEN",
                                },
                            ],
                            "ports": [{"name": "metrics", "containerPort": 9090, "protocol": "TCP"}],
                            "resources": {"requests": {"nvidia.com/gpu": 1}, "limits": {"nvidia.com/gpu": 1}},
                            "volumeMounts": [
                                {"name": "config", "mountPath": "/etc/kubetune", "readOnly": True},
                                {"name": "scratch", "mountPath": "/scratch"},
                                {"name": "tmp", "mountPath": "/tmp"},
                            ],
                            "terminationMessagePath": "/dev/termination-log",
                            "terminationMessagePolicy": "FallbackToLogsOnError",
                            "securityContext": {
                                "allowPrivilegeEscalation": False,
                                "capabilities": {"drop": ["ALL"]},
                                "readOnlyRootFilesystem": True,
                                "runAsNonRoot": True,
                            },
                        }
                    ],
                    "volumes": [
                        {"name": "config", "configMap": {"name": "support-bot-config"}},
                        {"name": "scratch", "emptyDir": {}},
                        {"name": "tmp", "emptyDir": {}},
                    ],
                },
            },
        },
    }


def _pod(manifest: dict[str, Any]) -> dict[str, Any]:
    pod: dict[str, Any] = manifest["spec"]["template"]["spec"]
    return pod


def test_permanent_failure_exit_code_is_the_contracts(config: OperatorConfig) -> None:
    rule = build_trainer_job(job_for(), config)["spec"]["podFailurePolicy"]["rules"][0]
    assert rule["onExitCodes"]["values"] == [contract.EXIT_CODE_PERMANENT_FAILURE]


def test_interrupted_exit_code_is_retried_uncounted(config: OperatorConfig) -> None:
    rules = build_trainer_job(job_for(), config)["spec"]["podFailurePolicy"]["rules"]
    ignored = [r["onExitCodes"]["values"] for r in rules if r["action"] == "Ignore" and "onExitCodes" in r]
    assert ignored == [[contract.EXIT_CODE_INTERRUPTED]]


def test_pvc_base_model_mounts_the_claim_read_only_where_the_trainer_reads_it(config: OperatorConfig) -> None:
    job = job_for(baseModel={"uri": "pvc://model-store/llama-3.2-1b/v2"})
    pod = _pod(build_trainer_job(job, config))
    assert {
        "name": "base-model",
        "persistentVolumeClaim": {"claimName": "model-store", "readOnly": True},
    } in pod["volumes"]
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "base-model")
    assert mount == {"name": "base-model", "mountPath": "/mnt/pvc/model-store", "readOnly": True}
    # The trainer resolves pvc://claim/path under its PVC root: the path it opens lies inside the mount.
    root = f"{contract.DEFAULT_PVC_ROOT}/model-store/llama-3.2-1b/v2"
    assert root.startswith(mount["mountPath"] + "/")


@pytest.mark.parametrize("uri", ["s3://models/llama-3.2-1b/", "hf://meta-llama/Llama-3.2-1B"])
def test_other_base_models_mount_no_claim(config: OperatorConfig, uri: str) -> None:
    pod = _pod(build_trainer_job(job_for(baseModel={"uri": uri}), config))
    assert not any("persistentVolumeClaim" in v for v in pod["volumes"])


def test_gpus_use_the_named_resource_and_shared_memory(config: OperatorConfig) -> None:
    job = job_for(resources={"gpus": 4, "gpuResourceName": "amd.com/gpu", "cpu": "16", "memory": "128Gi"})
    pod = _pod(build_trainer_job(job, config))
    assert pod["containers"][0]["resources"] == {
        "requests": {"cpu": "16", "memory": "128Gi", "amd.com/gpu": 4},
        "limits": {"memory": "128Gi", "amd.com/gpu": 4},
    }
    assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in pod["volumes"]


def test_operator_default_gpu_resource_applies_when_the_job_names_none() -> None:
    config = OperatorConfig(gpu_resource_name="gpu.example.com/h100")
    pod = _pod(build_trainer_job(job_for(resources={"gpus": 2}), config))
    assert pod["containers"][0]["resources"]["limits"] == {"gpu.example.com/h100": 2}


def test_cpu_only_job_requests_no_gpu(config: OperatorConfig) -> None:
    pod = _pod(build_trainer_job(job_for(resources={"gpus": 0, "cpu": 2}), config))
    assert pod["containers"][0]["resources"] == {"requests": {"cpu": "2"}}
    assert all(v["name"] != "dshm" for v in pod["volumes"])


def test_scheduling_fields_are_passed_to_the_pod(config: OperatorConfig) -> None:
    toleration = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    job = job_for(
        resources={
            "gpus": 1,
            "nodeSelector": {"node.kubernetes.io/instance-type": "p5.48xlarge"},
            "tolerations": [toleration],
            "priorityClassName": "training-low",
        }
    )
    pod = _pod(build_trainer_job(job, config))
    assert pod["nodeSelector"] == {"node.kubernetes.io/instance-type": "p5.48xlarge"}
    assert pod["tolerations"] == [toleration]
    assert pod["priorityClassName"] == "training-low"


@pytest.mark.parametrize(
    ("suspend", "queue", "want_suspend", "want_label"),
    [(None, None, False, None), (True, None, True, None), (None, "gpu-queue", True, "gpu-queue")],
)
def test_suspend_and_kueue_queue(
    config: OperatorConfig,
    suspend: bool | None,
    queue: str | None,
    want_suspend: bool,
    want_label: str | None,
) -> None:
    manifest = build_trainer_job(job_for(suspend=suspend, queue_name=queue), config)
    assert manifest["spec"]["suspend"] is want_suspend
    assert manifest["metadata"]["labels"].get("kueue.x-k8s.io/queue-name") == want_label


def test_lifecycle_fields_are_copied(config: OperatorConfig) -> None:
    spec = build_trainer_job(
        job_for(backoffLimit=0, activeDeadlineSeconds=7200, ttlSecondsAfterFinished=600), config
    )["spec"]
    assert (spec["backoffLimit"], spec["activeDeadlineSeconds"], spec["ttlSecondsAfterFinished"]) == (
        0,
        7200,
        600,
    )


def test_user_env_and_image_override(config: OperatorConfig) -> None:
    job = job_for(trainer={"image": "my/trainer:dev", "env": [{"name": "NCCL_DEBUG", "value": "INFO"}]})
    container = _pod(build_trainer_job(job, config))["containers"][0]
    assert container["image"] == "my/trainer:dev"
    assert container["env"][-2] == {"name": "NCCL_DEBUG", "value": "INFO"}


def test_every_secret_backed_variable_is_named_for_redaction_last(config: OperatorConfig) -> None:
    token = {"name": "WANDB_API_KEY", "valueFrom": {"secretKeyRef": {"name": "wandb", "key": "key"}}}
    unset = {"name": "KUBETUNE_SECRET_ENV", "value": ""}  # a user entry cannot switch redaction off
    job = job_for(trainer={"env": [token, unset]})
    env = _pod(build_trainer_job(job, config))["containers"][0]["env"]
    assert env[-1] == {
        "name": "KUBETUNE_SECRET_ENV",
        "value": "AWS_ACCESS_KEY_ID,AWS_SECRET_ACCESS_KEY,AWS_SESSION_TOKEN,WANDB_API_KEY",
    }


def test_no_s3_secret_means_no_aws_env_and_model_secret_gives_hf_token(config: OperatorConfig) -> None:
    job = job_for(
        s3={"endpoint": "http://minio:9000"},
        baseModel={"uri": "hf://meta-llama/Llama-3.2-1B", "credentialsSecretRef": {"name": "hf"}},
    )
    env = _pod(build_trainer_job(job, config))["containers"][0]["env"]
    names = [e["name"] for e in env]
    assert not any(n.startswith("AWS_") for n in names)
    assert env[-1] == {"name": "KUBETUNE_SECRET_ENV", "value": "HF_TOKEN"}
    assert env[-2] == {
        "name": "HF_TOKEN",
        "valueFrom": {"secretKeyRef": {"name": "hf", "key": "HF_TOKEN", "optional": True}},
    }


def test_config_map_holds_the_rendered_contract(config: OperatorConfig) -> None:
    manifest = build_config_map(job_for(), config)
    assert manifest["metadata"] == {
        "name": "support-bot-config",
        "namespace": "ml",
        "labels": CHILD_LABELS,
        "ownerReferences": [OWNER],
    }
    rendered = contract.TrainerConfig.from_json(manifest["data"]["config.json"])
    assert rendered.job == contract.JobRef(name="support-bot", namespace="ml", uid="uid-support-bot")
    assert rendered.base_model == "s3://models/llama-3.2-1b/"
    assert rendered.lora == contract.LoraConfig(r=16, alpha=32, dropout=0.05, target_modules=None)
    assert rendered.hyperparameters.epochs == 3 and rendered.hyperparameters.batch_tokens == 16384
    assert rendered.s3 == contract.S3Config(
        endpoint="http://minio.storage:9000", region="us-east-1", force_path_style=True
    )
    assert rendered.output.uri == "s3://adapters/support-bot/"
    assert rendered.gpus == 1 and rendered.metrics_port == 9090


def test_rendering_fills_operator_defaults(config: OperatorConfig) -> None:
    job = job_for(s3={}, checkpointing={"everySteps": 50, "keep": 3}, lora={"targetModules": []})
    rendered = render_trainer_config(job, config)
    assert rendered.s3.endpoint == "http://s3.default:9000"
    assert rendered.checkpointing == contract.CheckpointConfig(every_steps=50, every_minutes=None, keep=3)
    assert rendered.lora is not None and rendered.lora.target_modules is None


def test_full_method_renders_no_lora_block(config: OperatorConfig) -> None:
    rendered = render_trainer_config(job_for(method="Full"), config)
    assert rendered.method == "Full" and rendered.lora is None
    assert "lora" not in json.loads(rendered.to_json())


def test_qlora_renders_its_lora_block_and_no_merged_model(config: OperatorConfig) -> None:
    job = job_for(method="QLoRA", lora={"r": 8, "alpha": 16}, output={"uri": "s3://a/", "mergeAdapter": True})
    rendered = render_trainer_config(job, config)
    assert rendered.method == "QLoRA"
    assert rendered.lora == contract.LoraConfig(r=8, alpha=16, dropout=0.05, target_modules=None)
    assert rendered.output.merge_adapter is False  # nothing to merge a 4-bit base into


def test_dpo_renders_its_block_the_lora_block_and_the_start_adapter(config: OperatorConfig) -> None:
    from kubetune_trainer.config import validate

    job = job_for(
        method="DPO",
        dpo={"beta": 0.2, "labelSmoothing": 0.1},
        lora={"r": 8, "alpha": 16},
        baseModel={"uri": "s3://models/m/", "adapter": {"uri": "s3://adapters/sft/", "sha256": "ab" * 32}},
        dataset={"train": "s3://d/prefs.jsonl", "format": "Preference"},
        output={"uri": "s3://adapters/dpo/", "mergeAdapter": True},
    )
    rendered = render_trainer_config(job, config)
    assert rendered.method == "DPO" and rendered.weights_method == "LoRA"
    assert rendered.dpo == contract.DpoConfig(beta=0.2, label_smoothing=0.1, parameters="LoRA")
    assert rendered.lora == contract.LoraConfig(r=8, alpha=16, dropout=0.05, target_modules=None)
    assert rendered.adapter == contract.StartAdapter(uri="s3://adapters/sft/", sha256="ab" * 32)
    assert rendered.output.merge_adapter is True
    assert validate(contract.TrainerConfig.from_json(rendered.to_json())) == []
    # Defaults: the dpo block omitted still reaches the trainer with the CRD's defaults.
    plain = render_trainer_config(job_for(method="DPO"), config)
    assert plain.dpo == contract.DpoConfig() and plain.lora == contract.LoraConfig()
    assert plain.adapter is None


def test_dpo_on_full_weights_renders_no_lora_and_no_merge(config: OperatorConfig) -> None:
    from kubetune_trainer.config import validate

    output = {"uri": "s3://models/dpo/", "mergeAdapter": True}
    job = job_for(method="DPO", dpo={"parameters": "Full"}, output=output)
    rendered = render_trainer_config(job, config)
    assert rendered.lora is None and rendered.weights_method == "Full"
    assert rendered.output.merge_adapter is False
    assert validate(rendered) == []


def test_activation_checkpointing_is_rendered_with_its_default(config: OperatorConfig) -> None:
    assert render_trainer_config(job_for(), config).hyperparameters.activation_checkpointing == "Auto"
    hp = {"epochs": 1, "activationCheckpointing": "Always"}
    rendered = render_trainer_config(job_for(hyperparameters=hp), config)
    assert rendered.hyperparameters.activation_checkpointing == "Always"


def test_lora_target_modules_and_dataset_options(config: OperatorConfig) -> None:
    job = job_for(
        lora={"r": 8, "alpha": 16, "dropout": 0.1, "targetModules": ["q_proj", "v_proj"]},
        dataset={
            "train": "s3://d/train/",
            "validationSplit": 0.1,
            "format": "Alpaca",
            "columnMap": {"instruction": "question"},
            "maxSeqLength": 4096,
        },
    )
    rendered = render_trainer_config(job, config)
    assert rendered.lora == contract.LoraConfig(
        r=8, alpha=16, dropout=0.1, target_modules=["q_proj", "v_proj"]
    )
    assert rendered.dataset == contract.DatasetConfig(
        train="s3://d/train/",
        validation_split=0.1,
        format="Alpaca",
        column_map={"instruction": "question"},
        max_seq_length=4096,
    )


def built_from(config: OperatorConfig, **spec: Any) -> dict[str, str]:
    manifest = build_trainer_job(job_for(**spec), config)
    recorded: dict[str, str] = json.loads(manifest["metadata"]["annotations"]["kubetune.io/built-from"])
    return recorded


@pytest.mark.parametrize(
    ("edit", "changed"),
    [
        ({"resources": {"gpus": 2}}, {"spec.resources"}),
        ({"trainer": {"image": "registry.example/trainer:v2"}}, {"spec.trainer.image"}),
        ({"trainer": {"env": [{"name": "NCCL_DEBUG", "value": "INFO"}]}}, {"spec.trainer.env"}),
        ({"queueName": "gpu-queue"}, {"spec.queueName"}),
        ({"s3": {"endpoint": "http://other:9000"}}, {"spec.s3"}),
        ({"checkpointing": {"everySteps": 50}}, {"spec.checkpointing"}),
        ({"backoffLimit": 7, "activeDeadlineSeconds": 60, "ttlSecondsAfterFinished": 5}, set()),
        ({"suspend": True}, set()),
    ],
)
def test_trainer_job_records_a_hash_of_each_field_its_pod_was_built_from(
    edit: dict[str, Any], changed: set[str], config: OperatorConfig
) -> None:
    before, after = built_from(config), built_from(config, **edit)
    assert {field for field in before if before[field] != after[field]} == changed


ROOT = Path(__file__).resolve().parents[2]
READ_LIVE = {"suspend", "schedulingTimeoutSeconds", "progressDeadlineSeconds", "startupDeadlineSeconds"}
"""Spec fields every reconcile pass reads afresh: an edit takes effect without touching the trainer Job."""


def test_every_spec_field_a_user_may_edit_is_applied_or_refused_out_loud(config: OperatorConfig) -> None:
    """A field the CRD lets a user change after creation is read live, patched onto the running Job, or
    hashed on the Job so an edit is reported (SpecChangeNotApplied): none is silently ignored."""
    crd = yaml.safe_load((ROOT / "crds" / "kubetune.io_finetunejobs.yaml").read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    whole_spec_rules = " ".join(r["rule"] for r in spec.get("x-kubernetes-validations", []))
    mutable = {
        name
        for name, field in spec["properties"].items()
        if not any("oldSelf" in r["rule"] for r in field.get("x-kubernetes-validations", []))
        and f"oldSelf.{name}" not in whole_spec_rules
    }
    patched = set(updatable_job_fields(job_for()))
    reported = {key.removeprefix("spec.").split(".")[0] for key in built_from(config)}
    assert mutable == READ_LIVE | patched | reported, mutable ^ (READ_LIVE | patched | reported)


def test_trainer_pod_settings_come_from_the_chart_unless_the_job_sets_its_own() -> None:
    defaults = TrainerPodDefaults.from_json(
        json.dumps(
            {
                "serviceAccountName": "trainer",
                "imagePullSecrets": [{"name": "registry"}],
                "runtimeClassName": "nvidia",
                "terminationGracePeriodSeconds": 600,
                "ephemeralStorage": "100Gi",
                "podAnnotations": {"mesh.io/inject": "false"},
                "podLabels": {"cost-center": "ml", "kubetune.io/job-name": "spoofed"},
                "topologySpreadConstraints": [
                    {"maxSkew": 1, "topologyKey": "zone", "whenUnsatisfiable": "ScheduleAnyway"}
                ],
            }
        )
    )
    config = OperatorConfig(trainer_pod_defaults=defaults)
    pod = build_trainer_job(job_for(), config)["spec"]["template"]
    spec = pod["spec"]
    assert (spec["serviceAccountName"], spec["runtimeClassName"]) == ("trainer", "nvidia")
    assert spec["imagePullSecrets"] == [{"name": "registry"}] and spec["terminationGracePeriodSeconds"] == 600
    assert spec["automountServiceAccountToken"] is False  # a ServiceAccount never brings an API token
    assert spec["topologySpreadConstraints"][0]["topologyKey"] == "zone"
    scratch = next(v for v in spec["volumes"] if v["name"] == "scratch")
    assert scratch["emptyDir"] == {"sizeLimit": "100Gi"}
    resources = spec["containers"][0]["resources"]
    assert resources["requests"]["ephemeral-storage"] == resources["limits"]["ephemeral-storage"] == "100Gi"
    assert pod["metadata"]["annotations"] == {"mesh.io/inject": "false"}
    assert pod["metadata"]["labels"]["cost-center"] == "ml"
    assert pod["metadata"]["labels"]["kubetune.io/job-name"] == "support-bot"  # the operator's labels win

    own = job_for(
        trainer={"serviceAccountName": "team-a", "terminationGracePeriodSeconds": 120},
        resources={"gpus": 1, "ephemeralStorage": "20Gi", "affinity": {"nodeAffinity": {}}},
    )
    spec = build_trainer_job(own, config)["spec"]["template"]["spec"]
    assert (spec["serviceAccountName"], spec["terminationGracePeriodSeconds"]) == ("team-a", 120)
    assert spec["affinity"] == {"nodeAffinity": {}}
    assert next(v for v in spec["volumes"] if v["name"] == "scratch")["emptyDir"] == {"sizeLimit": "20Gi"}


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("{not json", "is not JSON"),
        ("[]", "must be a JSON object"),
        ('{"serviceAcount": "x"}', "unknown key 'serviceAcount'"),
        ('{"terminationGracePeriodSeconds": "300"}', "terminationGracePeriodSeconds: expected int, got str"),
    ],
)
def test_bad_trainer_pod_defaults_stop_the_operator_naming_the_setting(text: str, words: str) -> None:
    with pytest.raises(ConfigError, match="KUBETUNE_TRAINER_POD_DEFAULTS") as caught:
        OperatorConfig.from_env({"KUBETUNE_TRAINER_POD_DEFAULTS": text})
    assert words in str(caught.value)


def test_trainer_job_carries_the_updatable_fields_only_when_set(config: OperatorConfig) -> None:
    spec = build_trainer_job(
        job_for(backoffLimit=0, activeDeadlineSeconds=3600, ttlSecondsAfterFinished=0), config
    )["spec"]
    assert (spec["backoffLimit"], spec["activeDeadlineSeconds"], spec["ttlSecondsAfterFinished"]) == (
        0,
        3600,
        0,
    )
    unset = build_trainer_job(job_for(), config)["spec"]
    assert "activeDeadlineSeconds" not in unset and "ttlSecondsAfterFinished" not in unset

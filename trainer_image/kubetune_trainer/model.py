"""The base model: where it comes from (S3 prefix, PVC or local path, Hugging Face Hub), how it loads, and
how LoRA or full fine-tuning is set up on it."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from kubetune_trainer import contract
from kubetune_trainer.contract import LoraConfig, StartAdapter, TrainerReason
from kubetune_trainer.errors import TrainerError
from kubetune_trainer.storage import S3Uri, Storage


def fetch_base_model(uri: str, storage: Storage | None, work_dir: Path) -> tuple[Path, dict[str, Any]]:
    """A local directory holding the model, and its provenance (what was read, with digests)."""
    if uri.startswith("s3://"):
        if storage is None:
            raise TrainerError(TrainerReason.INVALID_CONFIG, f"baseModel {uri} needs S3 settings")
        return _fetch_s3_model(uri, storage, work_dir / "base-model")
    if uri.startswith("hf://"):
        return _fetch_hub_model(uri, work_dir)
    local = _local_path(uri)
    if not (local / "config.json").is_file():
        raise TrainerError(
            TrainerReason.MODEL_NOT_FOUND,
            f"baseModel {uri}: no config.json in {local}; point it at a Hugging Face model directory",
        )
    return local, {"uri": uri, "path": str(local)}


def _local_path(uri: str) -> Path:
    if uri.startswith("pvc://"):
        return Path(os.environ.get(contract.PVC_ROOT_ENV, contract.DEFAULT_PVC_ROOT)) / uri[len("pvc://") :]
    return Path(uri)


def read_model_config(uri: str, storage: Storage | None, work_dir: Path) -> dict[str, Any] | None:
    """The base model's config.json, read without fetching any weights; None where it is not there
    (``fetch_base_model`` then says what is missing)."""
    if uri.startswith("s3://"):
        if storage is None:
            return None
        location = S3Uri.parse((uri if uri.endswith("/") else uri + "/") + "config.json")
        if storage.exists(location, not_found=TrainerReason.MODEL_NOT_FOUND) is None:
            return None
        text = storage.read(location, not_found=TrainerReason.MODEL_NOT_FOUND).data
    elif uri.startswith("hf://"):
        repo, _, revision = uri[len("hf://") :].partition("@")
        try:
            from huggingface_hub import hf_hub_download

            cache_dir = os.environ.get("HF_HOME", str(work_dir / "hf"))
            path = hf_hub_download(repo, "config.json", revision=revision or None, cache_dir=cache_dir)
            text = Path(path).read_bytes()
        except Exception:  # the download of the whole model reports the cause
            return None
    else:
        path = _local_path(uri) / "config.json"
        if not path.is_file():
            return None
        text = path.read_bytes()
    try:
        config = json.loads(text)
    except ValueError as err:
        raise TrainerError(
            TrainerReason.INVALID_MODEL, f"baseModel {uri}: config.json is not JSON ({err})"
        ) from err
    if not isinstance(config, dict):
        raise TrainerError(TrainerReason.INVALID_MODEL, f"baseModel {uri}: config.json is not a JSON object")
    return config


def fetch_tokenizer_files(uri: str, storage: Storage | None, work_dir: Path) -> Path:
    """A local directory with the base model's config.json and tokenizer files, never its weights: what the
    validation pod tokenizes with, and what the token cache's digest covers."""
    from kubetune_trainer.dataset_cache import is_tokenizer_file

    if uri.startswith("s3://"):
        if storage is None:
            raise TrainerError(TrainerReason.INVALID_CONFIG, f"baseModel {uri} needs S3 settings")
        prefix = S3Uri.parse(uri if uri.endswith("/") else uri + "/")
        objects = storage.list(prefix, not_found=TrainerReason.MODEL_NOT_FOUND)
        dest = work_dir / "tokenizer"
        found = False
        for info in objects:
            name = info.uri.key[len(prefix.key) :]
            if "/" not in name and is_tokenizer_file(name):
                storage.download(info.uri, dest / name, not_found=TrainerReason.MODEL_NOT_FOUND)
                found = found or name == "config.json"
        if not found:
            raise TrainerError(
                TrainerReason.MODEL_NOT_FOUND if not objects else TrainerReason.INVALID_MODEL,
                f"baseModel {uri} has no config.json; upload a Hugging Face model directory (config.json, "
                "*.safetensors, tokenizer files) there",
            )
        return dest
    if uri.startswith("hf://"):
        repo, _, revision = uri[len("hf://") :].partition("@")
        try:
            from huggingface_hub import snapshot_download

            path = snapshot_download(
                repo_id=repo,
                revision=revision or None,
                cache_dir=os.environ.get("HF_HOME", str(work_dir / "hf")),
                allow_patterns=["*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken"],
            )
        except Exception as err:  # the hub client raises many types (offline, gated, missing revision)
            raise TrainerError(
                TrainerReason.MODEL_NOT_FOUND,
                f"baseModel {uri}: cannot download its tokenizer from the Hugging Face Hub "
                f"({type(err).__name__}: {err}); mirror the model to S3 and use an s3:// URI",
            ) from err
        return Path(path)
    local = _local_path(uri)
    if not (local / "config.json").is_file():
        raise TrainerError(
            TrainerReason.MODEL_NOT_FOUND,
            f"baseModel {uri}: no config.json in {local}; point it at a Hugging Face model directory",
        )
    return local


def _fetch_s3_model(uri: str, storage: Storage, dest: Path) -> tuple[Path, dict[str, Any]]:
    prefix = S3Uri.parse(uri if uri.endswith("/") else uri + "/")
    objects = storage.list(prefix, not_found=TrainerReason.MODEL_NOT_FOUND)
    if not objects:
        raise TrainerError(
            TrainerReason.MODEL_NOT_FOUND,
            f"baseModel {uri} holds no objects; upload the model directory there",
        )
    names = [o.uri.key[len(prefix.key) :] for o in objects]
    if "config.json" not in names:
        raise TrainerError(
            TrainerReason.INVALID_MODEL,
            f"baseModel {uri} has no config.json (found {', '.join(names[:8])}); upload a Hugging Face model "
            "directory (config.json, *.safetensors, tokenizer files)",
        )
    files = {}
    for name, info in zip(names, objects, strict=True):
        if name.endswith("/"):
            continue
        fetched = storage.download(info.uri, dest / name, not_found=TrainerReason.MODEL_NOT_FOUND)
        files[name] = {"etag": fetched.etag, "sha256": fetched.sha256, "bytes": info.size}
    digest = hashlib.sha256("".join(f"{n}:{f['sha256']}\n" for n, f in sorted(files.items())).encode())
    return dest, {"uri": uri, "sha256": digest.hexdigest(), "files": files}


def _fetch_hub_model(uri: str, work_dir: Path) -> tuple[Path, dict[str, Any]]:
    repo, _, revision = uri[len("hf://") :].partition("@")
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(
            repo_id=repo,
            revision=revision or None,
            cache_dir=os.environ.get("HF_HOME", str(work_dir / "hf")),
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"],
        )
    except Exception as err:  # the hub client raises many types (offline, gated, missing revision)
        raise TrainerError(
            TrainerReason.MODEL_NOT_FOUND,
            f"baseModel {uri}: cannot download from the Hugging Face Hub ({type(err).__name__}: {err}); "
            "mirror the model to S3 and use an s3:// URI where the cluster has no Hub access",
        ) from err
    resolved = Path(path).name  # the snapshot directory is named by the commit hash
    return Path(path), {"uri": uri, "revision": resolved}


def load_tokenizer(path: Path, uri: str) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as err:
        raise TrainerError(
            TrainerReason.INVALID_MODEL, f"baseModel {uri}: the tokenizer does not load ({err})"
        ) from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: Path, uri: str, dtype: Any, **options: Any) -> Any:
    """The causal LM, or InvalidModel saying what is missing; ``options`` go to ``from_pretrained``
    (quantization and placement, see ``preparation.load_base_model``)."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **options)
    except Exception as err:
        raise TrainerError(
            TrainerReason.INVALID_MODEL,
            f"baseModel {uri}: the model does not load ({type(err).__name__}: {err})",
        ) from err
    return model


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def fetch_start_adapter(
    adapter: StartAdapter, storage: Storage, work_dir: Path
) -> tuple[Path, dict[str, Any]]:
    """The PEFT adapter training starts from (``baseModel.adapter``), in a local directory, and its
    provenance; the sha256 of adapter_model.safetensors is checked against ``adapter.sha256`` when given
    (the digest a FineTuneJob reports in status.adapter.sha256)."""
    prefix = S3Uri.parse(adapter.uri if adapter.uri.endswith("/") else adapter.uri + "/")
    listed = storage.list(prefix, not_found=TrainerReason.MODEL_NOT_FOUND)
    names = {o.uri.key[len(prefix.key) :]: o for o in listed}
    missing = [name for name in ADAPTER_FILES if name not in names]
    if missing:
        found = f"found {', '.join(sorted(names)[:8])}" if names else "it holds no objects"
        raise TrainerError(
            TrainerReason.MODEL_NOT_FOUND,
            f"baseModel.adapter {adapter.uri} has no {' or '.join(missing)} ({found}); point it at a PEFT "
            "adapter, e.g. another FineTuneJob's status.adapter.uri",
        )
    dest = work_dir / "start-adapter"
    files = {}
    for name in ADAPTER_FILES:
        fetched = storage.download(names[name].uri, dest / name, not_found=TrainerReason.MODEL_NOT_FOUND)
        files[name] = fetched.sha256
    digest = files["adapter_model.safetensors"]
    if adapter.sha256 is not None and adapter.sha256 != digest:
        raise TrainerError(
            TrainerReason.INVALID_MODEL,
            f"baseModel.adapter {adapter.uri}: adapter_model.safetensors has sha256 {digest}, not the "
            f"{adapter.sha256} the job names; the adapter changed since that digest was taken: check the URI "
            "or update baseModel.adapter.sha256",
        )
    return dest, {"uri": adapter.uri, "sha256": digest}


def apply_method(model: Any, method: str, lora: LoraConfig | None, start: Path | None = None) -> Any:
    """LoRA adapters on the chosen (default: every linear) layers, for LoRA and QLoRA alike (on QLoRA's 4-bit
    layers PEFT puts float adapters beside the quantized weight), or every weight trainable for Full. With
    ``start`` (a PEFT adapter directory) the adapters are that adapter's, trainable, and its own settings
    (r, alpha, dropout, target modules) replace ``lora``."""
    if method == "Full":
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return model
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, get_peft_model

    if start is not None:
        try:
            return PeftModel.from_pretrained(model, start, is_trainable=True)
        except Exception as err:  # PEFT raises several types for an adapter of another shape
            raise TrainerError(
                TrainerReason.INVALID_MODEL,
                f"baseModel.adapter does not fit this base model ({type(err).__name__}: {err}); start from "
                "an adapter trained on the same baseModel.uri",
            ) from err

    lora = lora or LoraConfig()
    peft_config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules or "all-linear",
        task_type="CAUSAL_LM",
        bias="none",
    )
    try:
        return get_peft_model(model, peft_config)
    except ValueError as err:
        raise TrainerError(
            TrainerReason.INVALID_CONFIG,
            f"lora.targetModules {lora.target_modules}: {err}; name modules the model has "
            "(e.g. q_proj, v_proj)",
        ) from err


def trainable_parameters(model: Any) -> dict[str, Any]:
    """Trainable parameters by name (tied weights once), the part of the model a checkpoint stores."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def disable_dropout(model: Any) -> int:
    """Set every dropout layer's probability to 0 (LoRA's adapter dropout included); returns how many.
    Preference tuning scores the reference without dropout, so the policy must train without it too: with
    it, every pair's reward margin would start as noise instead of 0."""
    from torch import nn

    layers = [module for module in model.modules() if isinstance(module, nn.Dropout)]
    for layer in layers:
        layer.p = 0.0
    return len(layers)

"""The result in S3: the PEFT adapter (or the full model) with the tokenizer files and a training summary,
uploaded files first and ``manifest.json`` last, so a reader that sees the manifest sees a complete set."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from kubetune_trainer.contract import ADAPTER_METHODS, AdapterRecord, Selection
from kubetune_trainer.storage import S3Uri, Storage, sha256_file

OUTPUT_MANIFEST = "manifest.json"
SUMMARY_FILE = "training_summary.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MODEL_WEIGHTS = "model.safetensors"
MERGED_DIR = "merged"


def base_dtype(model_config: dict[str, Any]) -> str | None:
    """The dtype the base model's weights are stored in, as its config.json names it ("bfloat16", ...);
    None where it names none. Newer transformers write ``dtype``, older ones ``torch_dtype``."""
    named = model_config.get("dtype") or model_config.get("torch_dtype")
    return named.removeprefix("torch.") if isinstance(named, str) and named != "auto" else None


def write_local(
    model: Any,
    tokenizer: Any,
    method: str,
    base_model_uri: str,
    summary: dict[str, Any],
    dest: Path,
    merge_adapter: bool,
    weights_dtype: str | None = None,
) -> None:
    """Save the result into ``dest`` in Hugging Face / PEFT layout. A fully fine-tuned model is written in
    ``weights_dtype`` (the base's, see ``base_dtype``): it trained over float32 master weights, but its users
    load it like the base it came from."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    if method not in ADAPTER_METHODS and weights_dtype is not None:
        import torch

        dtype = getattr(torch, weights_dtype, None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"the base model's config.json names dtype {weights_dtype!r}, not a float type")
        model = model.to(dtype)
    model.save_pretrained(dest, safe_serialization=True)
    if method in ADAPTER_METHODS:
        # Name the base model by its URI rather than the pod-local directory it was loaded from.
        adapter_config = dest / "adapter_config.json"
        values = json.loads(adapter_config.read_text())
        values["base_model_name_or_path"] = base_model_uri
        adapter_config.write_text(json.dumps(values, indent=2, sort_keys=True))
    (dest / "README.md").unlink(missing_ok=True)  # PEFT's generated model card: not ours to publish
    tokenizer.save_pretrained(dest)
    (dest / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True, default=str))
    if method == "LoRA" and merge_adapter:
        merged = model.merge_and_unload()
        merged.save_pretrained(dest / MERGED_DIR, safe_serialization=True)
        tokenizer.save_pretrained(dest / MERGED_DIR)


def upload(
    storage: Storage,
    source: Path,
    output_uri: str,
    base_model_uri: str,
    method: str,
    job: dict[str, str],
    report: dict[str, Any],
) -> AdapterRecord:
    """Upload every file under ``source`` to ``output_uri``, then the manifest (which also carries ``report``,
    the final metrics and progress); returns the record for the status."""
    target = S3Uri.parse(output_uri)
    files = sorted(p for p in source.rglob("*") if p.is_file())
    digests = {}
    for path in files:
        name = path.relative_to(source).as_posix()
        storage.upload_file(path, target.join(name))
        digests[name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    manifest = {
        "files": digests,
        "method": method,
        "baseModel": base_model_uri,
        "job": job,
        **report,
        "completedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    storage.write(target.join(OUTPUT_MANIFEST), json.dumps(manifest, indent=2).encode(), "application/json")
    return record_from_manifest(manifest, output_uri)


def weights_file(method: str) -> str:
    """The weights file a result of ``method`` is known by (its sha256 is the one the status reports)."""
    return ADAPTER_WEIGHTS if method in ADAPTER_METHODS else MODEL_WEIGHTS


def record_from_manifest(manifest: dict[str, Any], output_uri: str) -> AdapterRecord:
    files: dict[str, dict[str, Any]] = manifest["files"]
    weights = weights_file(manifest["method"])
    if weights not in files:  # sharded full model: the first shard
        shards = sorted(n for n in files if n.startswith("model-") and n.endswith(".safetensors"))
        weights = shards[0] if shards else weights
    return AdapterRecord(
        uri=output_uri,
        files=sorted(n for n in files if "/" not in n),
        size_bytes=sum(int(f["bytes"]) for f in files.values()),
        sha256=str(files.get(weights, {}).get("sha256", "")),
        base_model=str(manifest.get("baseModel", "")),
        selected=_selection(manifest.get("selected")),
    )


def _selection(value: Any) -> Selection | None:
    """The manifest's record of which step's weights it holds (absent in results published before it)."""
    if not isinstance(value, dict):
        return None
    step, loss = value.get("step"), value.get("evalLoss")
    if not isinstance(step, int) or not isinstance(value.get("select"), str):
        return None
    return Selection(str(value["select"]), step, float(loss) if isinstance(loss, int | float) else None)


def published(storage: Storage, output_uri: str, job_uid: str) -> tuple[AdapterRecord, dict[str, Any]] | None:
    """The record of a result this job already published (a restart after success must not retrain)."""
    if not job_uid:
        return None  # a run outside a FineTuneJob: always train
    location = S3Uri.parse(output_uri).join(OUTPUT_MANIFEST)
    if storage.exists(location) is None:
        return None
    manifest = json.loads(storage.read(location).data)
    if manifest.get("job", {}).get("uid") != job_uid:
        return None
    return record_from_manifest(manifest, output_uri), manifest

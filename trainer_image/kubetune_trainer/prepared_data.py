"""The tokenized examples a job trains on, made one way for the validation pod and the trainer: read every
record (validated, in one pass), hold out the validation split, tokenize. The trainer takes them from the
validation pod's cache (``dataset_cache``) when its key still matches, and makes them itself otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune_trainer import data, dataset_cache
from kubetune_trainer.contract import PREFERENCE_METHODS, TrainerConfig, TrainerReason
from kubetune_trainer.dataset_cache import CachedData, CacheKey
from kubetune_trainer.errors import TrainerError
from kubetune_trainer.metrics import log_event
from kubetune_trainer.storage import FetchedObject, ObjectInfo, Storage


@dataclass
class Records:
    """Every record of both splits, validated."""

    train: list[Any]  # data.Record, or data.PreferenceRecord for method DPO
    validation: list[Any]
    format: str
    train_objects: list[FetchedObject]
    validation_objects: list[FetchedObject]


def read_records(config: TrainerConfig, storage: Storage) -> Records:
    """Fetch and validate every record (InvalidDataset / EmptyDataset name the lines), then split. Method DPO
    reads preference pairs, and only DPO does."""
    dataset, seed = config.dataset, config.hyperparameters.seed
    preference = config.method in PREFERENCE_METHODS
    fmt, column_map = dataset.format, dataset.column_map
    train_parsed, train_objects = data.load_records(storage, dataset.train, fmt, column_map)
    check_data_fits_method(train_parsed, dataset.train, preference)
    val_records: list[Any] = []
    val_objects: list[FetchedObject] = []
    if dataset.validation:
        val_parsed, val_objects = data.load_records(storage, dataset.validation, fmt, column_map)
        check_data_fits_method(val_parsed, dataset.validation, preference)
        val_records = val_parsed.pairs if preference else val_parsed.records
    train_records: list[Any] = train_parsed.pairs if preference else train_parsed.records
    if dataset.validation_split:
        keep, held = data.split_validation(len(train_records), dataset.validation_split, seed)
        train_records, val_records = [train_records[i] for i in keep], [train_records[i] for i in held]
    log_event(
        "dataset",
        format=train_parsed.format,
        train_records=len(train_records),
        validation_records=len(val_records),
        files=len(train_objects) + len(val_objects),
    )
    return Records(train_records, val_records, train_parsed.format, train_objects, val_objects)


def check_data_fits_method(parsed: Any, uri: str, preference: bool) -> None:
    """Preference pairs for DPO, and only for DPO: InvalidDataset naming the format found otherwise."""
    if preference and not parsed.pairs:
        raise TrainerError(
            TrainerReason.INVALID_DATASET,
            f"{uri} holds {parsed.format} records; method DPO trains on preference pairs: "
            '{"prompt", "chosen", "rejected"} or {"input", "preferred_output", "non_preferred_output"} '
            "(see dataset formats in the README)",
        )
    if not preference and parsed.pairs:
        raise TrainerError(
            TrainerReason.INVALID_DATASET,
            f"{uri} holds preference pairs (format Preference), which only method DPO trains on; set "
            "method: DPO, or give records of an SFT format",
        )


def tokenize(records: Records, tokenizer: Any, config: TrainerConfig) -> CachedData:
    """Tokenize both splits (chat template, label masks, truncation to maxSeqLength; Text records longer than
    that cut into windows under textMode Chunk, so continued pretraining keeps their tails)."""
    dataset = config.dataset
    tokenize_one = data.Tokenize(tokenizer, dataset.max_seq_length, config.hyperparameters.train_on == "All")
    train: list[Any]
    validation: list[Any] = []
    if config.method in PREFERENCE_METHODS:  # both sides of each pair; a pair is never cut into windows
        train, train_stats = data.tokenize_pairs(records.train, tokenize_one, dataset.train)
    else:
        chunk = records.format == "Text" and dataset.text_mode == "Chunk"
        train, train_stats = data.tokenize_records(records.train, tokenize_one, dataset.train, chunk)
    stats = {"train": train_stats.as_dict()}
    if records.validation:
        source = dataset.validation or f"{dataset.train} (validationSplit)"
        if config.method in PREFERENCE_METHODS:
            validation, eval_stats = data.tokenize_pairs(records.validation, tokenize_one, source)
        else:
            validation, eval_stats = data.tokenize_records(records.validation, tokenize_one, source, chunk)
        stats["validation"] = eval_stats.as_dict()
    if train_stats.truncated:
        log_event("truncated", examples=train_stats.truncated, max_seq_length=dataset.max_seq_length)
    if train_stats.chunked:
        log_event("chunked", records=train_stats.chunked, windows=train_stats.windows)
    return CachedData(
        train=train,
        validation=validation,
        stats=stats,
        format=records.format,
        objects={
            "train": [o.provenance() for o in records.train_objects],
            "validation": [o.provenance() for o in records.validation_objects],
        },
        rows={"train": len(records.train), "validation": len(records.validation)},
    )


def key_of_records(config: TrainerConfig, tokenizer_dir: Path, records: Records) -> CacheKey:
    """The cache key of what was read: the ETags of the very bytes that were validated."""
    return dataset_cache.cache_key(
        config,
        dataset_cache.tokenizer_digest(tokenizer_dir),
        [dataset_cache.object_identity(o.uri, o.etag, len(o.data)) for o in records.train_objects],
        [dataset_cache.object_identity(o.uri, o.etag, len(o.data)) for o in records.validation_objects],
    )


def current_key(config: TrainerConfig, storage: Storage, tokenizer_dir: Path) -> CacheKey:
    """The cache key of the dataset as it is now (its objects' ETags, listed without reading them)."""

    def identities(uri: str | None) -> list[dict[str, Any]]:
        listed: list[ObjectInfo] = data.list_dataset(storage, uri) if uri else []
        return [dataset_cache.object_identity(o.uri, o.etag, o.size) for o in listed]

    return dataset_cache.cache_key(
        config,
        dataset_cache.tokenizer_digest(tokenizer_dir),
        identities(config.dataset.train),
        identities(config.dataset.validation),
    )


def vocabulary_size(tokenizer: Any, model_config: dict[str, Any] | None) -> int:
    """Token ids a cached example may hold: below the model's embedding rows (the tokenizer's size where
    config.json does not say)."""
    configured = (model_config or {}).get("vocab_size")
    return configured if type(configured) is int and configured > 0 else len(tokenizer)

"""The tokenized dataset cache: what the validation pod writes and the GPU pod reads instead of tokenizing
again.

Layout, under ``<output.uri>cache/<digest>/``:

    tokens.safetensors   int32 tensors, one set per split (``train``, and ``validation`` when there is one):
                           <split>.input_ids  every example's token ids, concatenated
                           <split>.labels     the labels, aligned with input_ids (-100: no loss)
                           <split>.lengths    each example's length, in order
    manifest.json        written last (a cache without it does not exist): format, version, the trainer
                         version, the key the digest was computed from, the size and sha256 of
                         tokens.safetensors, per split the examples, tokens and tokenizing counts, the
                         detected format and the dataset objects read (uri, ETag, sha256).

The digest is the sha256 of the key: the cache format version, the trainer version, the digest of the
tokenizer and config files, every dataset object's key, ETag and size, and the data settings that change
the tokens (format, columnMap, maxSeqLength, trainOn, validationSplit, seed). A changed dataset, tokenizer,
setting or trainer therefore names another cache, and a reader never trusts a cache whose manifest says
otherwise.

What is read back is untrusted: the manifest is size-limited JSON; the tensors are safetensors (no pickle),
checked for their names, dtype, shape, lengths, counts, token ids within the vocabulary and the sha256 the
manifest gives. Anything wrong makes the reader ignore the cache, say why, and the trainer tokenizes anew.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune_trainer import __version__ as TRAINER_VERSION
from kubetune_trainer.contract import TrainerConfig
from kubetune_trainer.packing import IGNORE_INDEX, Example
from kubetune_trainer.storage import S3Uri, Storage

CACHE_FORMAT = "kubetune-token-cache"
CACHE_VERSION = 1
CACHE_DIR = "cache/"
TOKENS_FILE = "tokens.safetensors"
MANIFEST_FILE = "manifest.json"
MANIFEST_READ_LIMIT = 1 << 20
"""Bytes of manifest.json a reader accepts."""
TOKENS_READ_LIMIT = 8 << 30
"""Bytes of tokens.safetensors a reader accepts (about a billion tokens with their labels)."""
SPLITS = ("train", "validation")
ARRAYS = ("input_ids", "labels", "lengths")

_TOKENIZER_NAMES = frozenset(
    {
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "merges.txt",
        "chat_template.jinja",
        "chat_template.json",
    }
)


def is_tokenizer_file(name: str) -> bool:
    """A file of a model directory that shapes tokenization (or the model's config): what the validation pod
    reads instead of the weights, and what the digest covers."""
    base = name.rsplit("/", 1)[-1]
    return (
        base in _TOKENIZER_NAMES
        or base.startswith(("vocab.", "tokenizer."))
        or (base.endswith(".model") and "/" not in name)
        or base.endswith(".tiktoken")
    )


def tokenizer_digest(model_dir: Path) -> str:
    """sha256 over the tokenizer and config files of a model directory (name and content of each)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in model_dir.iterdir() if p.is_file() and is_tokenizer_file(p.name)):
        digest.update(f"{path.name}:{hashlib.sha256(path.read_bytes()).hexdigest()}\n".encode())
    return digest.hexdigest()


def object_identity(uri: S3Uri, etag: str, size: int) -> dict[str, Any]:
    return {"uri": str(uri), "etag": etag, "bytes": size}


@dataclass(frozen=True)
class CacheKey:
    """Everything that decides the cached tokens; its digest names the cache."""

    tokenizer: str
    train: tuple[Mapping[str, Any], ...]
    validation: tuple[Mapping[str, Any], ...]
    settings: Mapping[str, Any]
    trainer_version: str = TRAINER_VERSION

    def as_dict(self) -> dict[str, Any]:
        return {
            "cacheVersion": CACHE_VERSION,
            "trainerVersion": self.trainer_version,
            "tokenizer": self.tokenizer,
            "train": [dict(o) for o in self.train],
            "validation": [dict(o) for o in self.validation],
            "settings": dict(self.settings),
        }

    @property
    def digest(self) -> str:
        canonical = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def data_settings(config: TrainerConfig) -> dict[str, Any]:
    """The job settings that change the tokens (or which records land in which split)."""
    data, hp = config.dataset, config.hyperparameters
    return {
        "format": data.format,
        "columnMap": dict(sorted((data.column_map or {}).items())),
        "maxSeqLength": data.max_seq_length,
        "textMode": data.text_mode,
        "trainOn": hp.train_on,
        "validationSplit": data.validation_split,
        "seed": hp.seed if data.validation_split else None,
    }


def cache_key(
    config: TrainerConfig,
    tokenizer: str,
    train: Sequence[Mapping[str, Any]],
    validation: Sequence[Mapping[str, Any]],
) -> CacheKey:
    return CacheKey(tokenizer, tuple(train), tuple(validation), data_settings(config))


def cache_uri(output_uri: str, digest: str) -> S3Uri:
    return S3Uri.parse(output_uri).join(f"{CACHE_DIR}{digest}/")


@dataclass
class CachedData:
    """The tokenized splits, with what provenance needs."""

    train: list[Example]
    validation: list[Example]
    stats: dict[str, dict[str, int]] = field(default_factory=dict)  # per split: TokenizeStats.as_dict()
    format: str = ""
    objects: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # per split: provenance()
    rows: dict[str, int] = field(default_factory=dict)  # records per split, before tokenizing


class CacheRejected(ValueError):
    """A cache that is not used; the message says why."""


def _arrays(examples: Sequence[Example]) -> dict[str, Any]:
    import numpy as np

    lengths = np.fromiter((len(e.input_ids) for e in examples), dtype=np.int32, count=len(examples))
    ids = np.fromiter(
        (t for e in examples for t in e.input_ids), dtype=np.int32, count=int(lengths.sum(dtype=np.int64))
    )
    labels = np.fromiter((t for e in examples for t in e.labels), dtype=np.int32, count=ids.size)
    return {"input_ids": ids, "labels": labels, "lengths": lengths}


def write(storage: Storage, key: CacheKey, output_uri: str, data: CachedData) -> S3Uri:
    """Write the cache for ``key``: the tensors first, the manifest last. Returns its URI."""
    from safetensors.numpy import save

    root = cache_uri(output_uri, key.digest)
    tensors: dict[str, Any] = {}
    splits: dict[str, Any] = {}
    for split, examples in (("train", data.train), ("validation", data.validation)):
        if split == "validation" and not examples:
            continue
        arrays = _arrays(examples)
        tensors.update({f"{split}.{name}": value for name, value in arrays.items()})
        splits[split] = {
            "examples": len(examples),
            "tokens": int(arrays["input_ids"].size),
            "rows": data.rows.get(split, len(examples)),
            "stats": data.stats.get(split, {}),
            "objects": data.objects.get(split, []),
        }
    blob = save(tensors, metadata={"format": CACHE_FORMAT, "version": str(CACHE_VERSION)})
    storage.write(root.join(TOKENS_FILE), blob)
    manifest = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "digest": key.digest,
        "key": key.as_dict(),
        "datasetFormat": data.format,
        "files": {TOKENS_FILE: {"bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}},
        "splits": splits,
    }
    storage.write(root.join(MANIFEST_FILE), json.dumps(manifest, indent=1).encode(), "application/json")
    return root


def read(
    storage: Storage, key: CacheKey, output_uri: str, vocab_size: int, max_seq_length: int
) -> tuple[CachedData | None, str]:
    """The cache for ``key`` if it exists and passes every check; else None and why (one line)."""
    root = cache_uri(output_uri, key.digest)
    try:
        return _read(storage, root, key, vocab_size, max_seq_length), ""
    except CacheRejected as err:
        return None, f"{root}: {err}"


def _read(storage: Storage, root: S3Uri, key: CacheKey, vocab_size: int, max_seq_length: int) -> CachedData:
    manifest_uri = root.join(MANIFEST_FILE)
    info = storage.exists(manifest_uri)
    if info is None:
        raise CacheRejected("no cache there (no manifest.json)")
    if info.size > MANIFEST_READ_LIMIT:
        raise CacheRejected(f"manifest.json is {info.size} bytes, over {MANIFEST_READ_LIMIT}")
    try:
        manifest = json.loads(storage.read(manifest_uri).data[:MANIFEST_READ_LIMIT])
    except ValueError as err:
        raise CacheRejected(f"manifest.json is not JSON ({err})") from err
    if not isinstance(manifest, dict) or manifest.get("format") != CACHE_FORMAT:
        raise CacheRejected("manifest.json is not a kubetune token cache manifest")
    if manifest.get("version") != CACHE_VERSION:
        raise CacheRejected(f"cache format version {manifest.get('version')!r} is not {CACHE_VERSION}")
    written_by = (
        (manifest.get("key") or {}).get("trainerVersion") if isinstance(manifest.get("key"), dict) else None
    )
    if written_by != key.trainer_version:
        raise CacheRejected(f"written by trainer {written_by!r}, this is trainer {key.trainer_version}")
    if manifest.get("key") != key.as_dict() or manifest.get("digest") != key.digest:
        raise CacheRejected("its key differs from this job's (dataset, tokenizer or data settings)")
    files = manifest.get("files")
    expected = files.get(TOKENS_FILE) if isinstance(files, dict) else None
    if not isinstance(expected, dict) or type(expected.get("bytes")) is not int:
        raise CacheRejected(f"manifest.json does not describe {TOKENS_FILE}")
    tokens_uri = root.join(TOKENS_FILE)
    tokens_info = storage.exists(tokens_uri)
    if tokens_info is None:
        raise CacheRejected(f"{TOKENS_FILE} is missing")
    if tokens_info.size != expected["bytes"] or tokens_info.size > TOKENS_READ_LIMIT:
        raise CacheRejected(
            f"{TOKENS_FILE} is {tokens_info.size} bytes; the manifest says {expected['bytes']} "
            f"(limit {TOKENS_READ_LIMIT})"
        )
    blob = storage.read(tokens_uri).data
    if hashlib.sha256(blob).hexdigest() != expected.get("sha256"):
        raise CacheRejected(f"{TOKENS_FILE} does not match the sha256 in manifest.json")
    splits = manifest.get("splits")
    if not isinstance(splits, dict) or not isinstance(splits.get("train"), dict):
        raise CacheRejected("manifest.json has no train split")
    tensors = _load_tensors(blob)
    wanted = {f"{split}.{name}" for split in splits for name in ARRAYS}
    if set(splits) - set(SPLITS) or set(tensors) != wanted:
        raise CacheRejected(f"{TOKENS_FILE} holds {sorted(tensors)}, expected {sorted(wanted)}")
    cached = CachedData(train=[], validation=[], format=str(manifest.get("datasetFormat") or ""))
    for split, described in splits.items():
        if not isinstance(described, dict):
            raise CacheRejected(f"split {split} is not described")
        examples = _examples(tensors, split, described, vocab_size, max_seq_length)
        setattr(cached, split, examples)
        cached.stats[split] = _int_map(described.get("stats"))
        objects = described.get("objects")
        cached.objects[split] = (
            [o for o in objects if isinstance(o, dict)] if isinstance(objects, list) else []
        )
        rows = described.get("rows")
        cached.rows[split] = rows if type(rows) is int else len(examples)
    return cached


def _load_tensors(blob: bytes) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.numpy import load

    try:
        return dict(load(blob))
    except (SafetensorError, ValueError) as err:
        raise CacheRejected(f"{TOKENS_FILE} is not a safetensors file ({err})") from err


def _examples(
    tensors: dict[str, Any], split: str, described: dict[str, Any], vocab_size: int, max_seq_length: int
) -> list[Example]:
    import numpy as np

    ids, labels, lengths = (tensors[f"{split}.{name}"] for name in ARRAYS)
    for name, array in zip(ARRAYS, (ids, labels, lengths), strict=True):
        if array.dtype != np.int32 or array.ndim != 1:
            raise CacheRejected(
                f"{split}.{name} is {array.dtype} with {array.ndim} dimension(s), not int32 1-D"
            )
    if described.get("examples") != lengths.size or described.get("tokens") != ids.size:
        raise CacheRejected(f"split {split}: the counts differ from the manifest's")
    if lengths.size == 0 and split == "train":
        raise CacheRejected("the train split is empty")
    if lengths.size and (lengths.min() < 1 or lengths.max() > max_seq_length):
        raise CacheRejected(f"split {split}: an example length is outside [1, {max_seq_length}]")
    if int(lengths.sum(dtype=np.int64)) != ids.size or labels.size != ids.size:
        raise CacheRejected(f"split {split}: lengths, input_ids and labels disagree")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise CacheRejected(f"split {split}: a token id is outside the vocabulary of {vocab_size}")
    real = labels[labels != IGNORE_INDEX]
    if real.size and (real.min() < 0 or real.max() >= vocab_size):
        raise CacheRejected(f"split {split}: a label is outside the vocabulary of {vocab_size}")
    bounds = np.concatenate(([0], np.cumsum(lengths, dtype=np.int64)))
    id_list, label_list = ids.tolist(), labels.tolist()
    return [
        Example(id_list[start:end], label_list[start:end])
        for start, end in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True)
    ]


def _int_map(value: Any) -> dict[str, int]:
    if not isinstance(value, dict):
        return {}
    return {str(k): v for k, v in value.items() if type(v) is int}

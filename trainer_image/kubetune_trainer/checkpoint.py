"""Checkpoints in S3 under ``<output.uri>checkpoints/step-<N>/``.

A checkpoint is a ``torch.distributed.checkpoint`` directory (``dcp/``: the trainable weights and the AdamW
moments, each process writing the shards it holds, so nothing is gathered on one process; with output.select
BestEval also the trainable weights of the best evaluation so far, under ``best``) and small JSON
files: the training state (step, losses), the step plan (which examples each step trains on) and each
process's RNG state, taken at the start of the step the restart runs first. ``manifest.json`` is written
last, by rank 0 once every process has uploaded its files; a checkpoint without one is incomplete and
ignored. Any number of processes can restore it: DCP reads the slices of each tensor a process holds.

Nothing read back is unpickled: tensors are read with ``weights_only`` loads into tensors the model and
optimizer already hold on the process's own device, the DCP metadata through an unpickler that builds only
DCP's own metadata types, and everything else is JSON.
"""

from __future__ import annotations

import io
import json
import pickle
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, StorageMeta

from kubetune_trainer.contract import TrainerReason
from kubetune_trainer.errors import TrainerError
from kubetune_trainer.metrics import log_event
from kubetune_trainer.storage import S3Uri, Storage, sha256_file

MANIFEST = "manifest.json"
FORMAT = "kubetune-dcp-1"
TENSORS = "dcp"  # the torch.distributed.checkpoint directory
STATE = "state.json"
STEP_PLAN = "step_plan.json"
BEST = "best"  # the DCP entry holding the best evaluation's weights
_STEP_DIR = re.compile(r"^step-(\d+)/$")
_FILE_NAME = re.compile(r"^(dcp/)?[A-Za-z0-9_.-]+$")


def rng_file(rank: int) -> str:
    return f"rng-rank-{rank}.json"


@dataclass(frozen=True)
class Found:
    """The newest complete checkpoint, downloaded and checked against its manifest."""

    step: int
    uri: str
    local: Path
    world_size: int  # of the run that wrote it

    def read_json(self, name: str) -> Any:
        return json.loads((self.local / name).read_text())


# ----------------------------------------------------------------------------------------------------
# RNG, as JSON
# ----------------------------------------------------------------------------------------------------


def capture_rng() -> dict[str, Any]:
    import torch

    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "torch": torch.random.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict[str, Any]) -> None:
    import torch

    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal), gauss))
    torch.random.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


# ----------------------------------------------------------------------------------------------------
# Tensors, through torch.distributed.checkpoint
# ----------------------------------------------------------------------------------------------------


def tensor_state(model: Any, optimizer: Any, best: dict[str, Any] | None = None) -> dict[str, Any]:
    """The tensors a checkpoint holds, by parameter name: the trainable weights and the optimizer's
    per-parameter state (sharded DTensors under FSDP, whole tensors otherwise), and ``best``, a copy of the
    trainable weights of another step, when given. The optimizer's hyperparameters are left out: the job's
    config sets them again."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(ignore_frozen_params=True)
    state = {
        "model": get_model_state_dict(model, options=options),
        "optimizer": get_optimizer_state_dict(model, optimizer, options=options)["state"],
    }
    if best is not None:
        state[BEST] = best
    return state


def load_tensor_state(
    model: Any, optimizer: Any, directory: Path, best: dict[str, Any] | None = None
) -> None:
    """Read the checkpoint's tensors into ``model`` and ``optimizer`` (and ``best``, when given) in place,
    whatever the number of processes that wrote it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(ignore_frozen_params=True)
    target = tensor_state(model, optimizer, best)  # also creates the optimizer's state to read into
    dcp.load(target, storage_reader=TensorOnlyReader(directory))
    set_model_state_dict(model, target["model"], options=StateDictOptions(strict=False))
    groups = get_optimizer_state_dict(model, optimizer, options=options)["param_groups"]
    set_optimizer_state_dict(
        model, optimizer, {"state": target["optimizer"], "param_groups": groups}, options=options
    )


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata classes, torch's dtypes, layouts and sizes, and paths; nothing else."""

    _METADATA = "torch.distributed.checkpoint.metadata"
    _ALLOWED = frozenset(
        {
            ("torch", "Size"),
            ("torch.serialization", "_get_layout"),  # how a torch.layout pickles
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),  # where each item lies in a file
            ("pathlib", "PosixPath"),  # where the checkpoint was written
            ("pathlib", "PurePosixPath"),
            ("collections", "OrderedDict"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        import torch

        if module == self._METADATA:
            found = super().find_class(module, name)
            if isinstance(found, type):  # a dataclass or enum of DCP's metadata, never a function
                return found
        elif module == "torch" and isinstance(
            getattr(torch, name, None), torch.dtype | torch.layout | torch.memory_format
        ):
            return getattr(torch, name)
        elif (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"checkpoint metadata names {module}.{name}, which it may not")


class TensorOnlyReader(FileSystemReader):
    """DCP's file reader, reading the metadata with ``_MetadataUnpickler`` and refusing a checkpoint with
    non-tensor entries (DCP would unpickle those)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self.path) / ".metadata"
        try:
            metadata = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, OSError) as err:
            raise TrainerError(
                TrainerReason.STORAGE_ERROR, f"checkpoint metadata {path.name} is not valid: {err}"
            ) from err
        if not isinstance(metadata, Metadata):
            raise TrainerError(TrainerReason.STORAGE_ERROR, "checkpoint metadata is not DCP metadata")
        pickled = [k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)]
        if pickled:
            raise TrainerError(
                TrainerReason.STORAGE_ERROR,
                f"checkpoint holds non-tensor entries ({', '.join(pickled[:3])}); it was not written here",
            )
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


# ----------------------------------------------------------------------------------------------------
# In S3
# ----------------------------------------------------------------------------------------------------


class Checkpointer:
    def __init__(
        self, storage: Storage, output_uri: str, work_dir: Path, keep: int, rank: int = 0, world_size: int = 1
    ) -> None:
        self.storage = storage
        self.root = S3Uri.parse(output_uri).join("checkpoints/")
        self.work_dir = work_dir
        self.keep = keep
        self.rank = rank
        self.world_size = world_size

    def uri(self, step: int) -> S3Uri:
        return self.root.join(f"step-{step:08d}/")

    def complete_steps(self) -> list[int]:
        """Steps with a manifest, oldest first."""
        return self._listed_steps()[1]

    def _listed_steps(self) -> tuple[list[int], list[int]]:
        """(steps with a directory, steps with a complete checkpoint), oldest first, from one listing."""
        seen: set[int] = set()
        complete: set[int] = set()
        for info in self.storage.list(self.root):
            head, _, name = info.uri.key[len(self.root.key) :].partition("/")
            match = _STEP_DIR.match(head + "/")
            if match:
                seen.add(int(match.group(1)))
                if name == MANIFEST:
                    complete.add(int(match.group(1)))
        return sorted(seen), sorted(complete)

    def save(
        self,
        step: int,
        model: Any,
        optimizer: Any,
        state: dict[str, Any],
        rng: dict[str, Any],
        plan: Any,
        best: dict[str, Any] | None = None,
    ) -> S3Uri:
        """Called by every process: each writes and uploads its shards and RNG state, then rank 0 the
        training state, the step plan and, last, the manifest listing every process's files. ``best``:
        the weights of the best evaluation, kept with the rest (output.select BestEval)."""
        import torch.distributed.checkpoint as dcp

        local = self.work_dir / f"checkpoint-{step}-rank-{self.rank}"
        writer = dcp.FileSystemWriter(str(local / TENSORS))
        dcp.save(tensor_state(model, optimizer, best), storage_writer=writer)
        (local / rng_file(self.rank)).write_text(json.dumps(rng))
        if self.rank == 0:
            (local / STATE).write_text(json.dumps(state, indent=2, sort_keys=True))
            (local / STEP_PLAN).write_text(json.dumps(plan.as_dict()))
        target = self.uri(step)
        files = {}
        for path in sorted(p for p in local.rglob("*") if p.is_file()):
            name = path.relative_to(local).as_posix()
            self.storage.upload_file(path, target.join(name))
            files[name] = sha256_file(path)
        everyone = self._gather(files)
        if self.rank == 0:
            listed = {name: digest for part in everyone for name, digest in part.items()}
            manifest = {"format": FORMAT, "step": step, "worldSize": self.world_size, "files": listed}
            self.storage.write(
                target.join(MANIFEST), json.dumps(manifest, indent=2).encode(), "application/json"
            )
            self.prune()
        _remove(local)
        return target

    def _gather(self, files: dict[str, str]) -> list[dict[str, str]]:
        """Every process's uploaded files, on every process (once all have uploaded)."""
        if self.world_size == 1:
            return [files]
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, files)
        return gathered

    def prune(self) -> None:
        """Keep the newest ``keep`` complete checkpoints; drop older ones and stale incomplete ones."""
        seen, complete = self._listed_steps()
        keep = set(complete[-self.keep :])
        newest = complete[-1] if complete else None
        for step in seen:
            if step in keep or (newest is not None and step > newest):
                continue  # a newer incomplete one may be being written by a racing pod: leave it
            self.storage.delete_prefix(self.uri(step))

    def fetch_latest(self) -> Found | None:
        """The newest complete checkpoint, every file downloaded and matching its manifest's digest; None
        when there is none (or only ones in a format this trainer does not read)."""
        steps = self.complete_steps()
        if not steps:
            return None
        step = steps[-1]
        source = self.uri(step)
        try:
            manifest = json.loads(self.storage.read(source.join(MANIFEST)).data)
            files = manifest["files"]
            fmt, world_size = manifest.get("format"), int(manifest.get("worldSize", 0))
            valid = isinstance(files, dict) and all(
                isinstance(n, str) and _FILE_NAME.match(n) and isinstance(d, str) for n, d in files.items()
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            valid, fmt, world_size, files = False, None, 0, {}
        if fmt != FORMAT:
            log_event("checkpoint_skipped", uri=str(source), reason=f"format {fmt!r} is not {FORMAT}")
            return None
        if not valid or STATE not in files or STEP_PLAN not in files:
            raise TrainerError(
                TrainerReason.STORAGE_ERROR,
                f"checkpoint {source}{MANIFEST} is malformed; delete {source} to resume from an older one",
            )
        local = self.work_dir / f"restore-{step}"
        for name, digest in files.items():
            fetched = self.storage.download(source.join(name), local / name)
            if fetched.sha256 != digest:
                raise TrainerError(
                    TrainerReason.STORAGE_ERROR,
                    f"checkpoint {source}{name} does not match its manifest "
                    f"(sha256 {fetched.sha256} != {digest}); delete {source} to resume from an older one",
                )
        return Found(step=step, uri=str(source), local=local, world_size=world_size)

    def restore(
        self, found: Found, model: Any, optimizer: Any, best: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Load ``found`` into the model, the optimizer, ``best`` (tensors shaped like the trainable
        weights, for the best evaluation's copy the checkpoint keeps; see ``keeps_best``) and this process's
        RNG; returns the training state. A process the writing run did not have keeps its seeded RNG."""
        from torch.distributed.checkpoint.api import CheckpointException

        TensorOnlyReader(found.local / TENSORS).read_metadata()  # refused here, not inside DCP's wrapping
        try:
            load_tensor_state(model, optimizer, found.local / TENSORS, best)
        except (CheckpointException, RuntimeError, ValueError, KeyError) as err:
            raise TrainerError(
                TrainerReason.INVALID_CONFIG,
                f"checkpoint {found.uri} does not fit this model ({type(err).__name__}: {err}); the job's "
                "method or lora settings changed since it was written",
            ) from err
        if (found.local / rng_file(self.rank)).is_file():
            restore_rng(found.read_json(rng_file(self.rank)))
        state = found.read_json(STATE)
        if not isinstance(state, dict):
            raise TrainerError(TrainerReason.STORAGE_ERROR, f"checkpoint {found.uri}{STATE} is malformed")
        return state


def keeps_best(found: Found) -> bool:
    """Whether the checkpoint holds a copy of the best evaluation's weights besides the current ones."""
    state = found.read_json(STATE)
    return isinstance(state, dict) and isinstance(state.get("best_weights_step"), int)


def _remove(directory: Path) -> None:
    import shutil

    shutil.rmtree(directory, ignore_errors=True)

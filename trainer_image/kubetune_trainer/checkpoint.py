"""Checkpoints in S3 under ``<output.uri>checkpoints/step-<N>/``.

A checkpoint holds the trainable weights (the LoRA adapter, or every weight for Full), the optimizer, the
RNG states and the training state (step, which is also the data position: the batch plan is a pure function
of the seed). ``manifest.json`` is written last, so a checkpoint without one is incomplete and ignored.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune_trainer.contract import TrainerReason
from kubetune_trainer.errors import TrainerError
from kubetune_trainer.storage import S3Uri, Storage, sha256_file

MANIFEST = "manifest.json"
WEIGHTS = "trainable.safetensors"
OPTIMIZER = "optimizer.pt"
RNG = "rng.pt"
STATE = "state.json"
_STEP_DIR = re.compile(r"^step-(\d+)/$")


@dataclass(frozen=True)
class Restored:
    step: int
    state: dict[str, Any]
    uri: str


def capture_rng() -> dict[str, Any]:
    import torch

    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    import torch

    random.setstate(state["python"])
    torch.random.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    def __init__(self, storage: Storage, output_uri: str, work_dir: Path, keep: int) -> None:
        self.storage = storage
        self.root = S3Uri.parse(output_uri).join("checkpoints/")
        self.work_dir = work_dir
        self.keep = keep

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

    def save(self, step: int, trainable: dict[str, Any], optimizer: Any, state: dict[str, Any]) -> S3Uri:
        import torch
        from safetensors.torch import save_file

        local = self.work_dir / f"checkpoint-{step}"
        local.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, str(local / WEIGHTS))
        torch.save(optimizer.state_dict(), local / OPTIMIZER)
        torch.save(capture_rng(), local / RNG)
        (local / STATE).write_text(json.dumps(state, indent=2, sort_keys=True))
        target = self.uri(step)
        files = {}
        for name in (WEIGHTS, OPTIMIZER, RNG, STATE):
            self.storage.upload_file(local / name, target.join(name))
            files[name] = sha256_file(local / name)
        manifest = {"step": step, "files": files}
        self.storage.write(target.join(MANIFEST), json.dumps(manifest, indent=2).encode(), "application/json")
        for path in local.iterdir():
            path.unlink()
        local.rmdir()
        self.prune()
        return target

    def prune(self) -> None:
        """Keep the newest ``keep`` complete checkpoints; drop older ones and stale incomplete ones."""
        seen, complete = self._listed_steps()
        keep = set(complete[-self.keep :])
        newest = complete[-1] if complete else None
        for step in seen:
            if step in keep or (newest is not None and step > newest):
                continue  # a newer incomplete one may be being written by a racing pod: leave it
            self.storage.delete_prefix(self.uri(step))

    def restore_latest(self, model_params: dict[str, Any], optimizer: Any) -> Restored | None:
        """Load the newest complete checkpoint into the model and optimizer; None when there is none."""
        import torch
        from safetensors.torch import load_file

        steps = self.complete_steps()
        if not steps:
            return None
        step = steps[-1]
        source = self.uri(step)
        local = self.work_dir / f"restore-{step}"
        manifest = json.loads(self.storage.read(source.join(MANIFEST)).data)
        for name, digest in manifest["files"].items():
            fetched = self.storage.download(source.join(name), local / name)
            if fetched.sha256 != digest:
                raise TrainerError(
                    TrainerReason.STORAGE_ERROR,
                    f"checkpoint {source}{name} does not match its manifest "
                    f"(sha256 {fetched.sha256} != {digest})",
                )
        weights = load_file(str(local / WEIGHTS))
        missing = sorted(set(model_params) - set(weights))
        unexpected = sorted(set(weights) - set(model_params))
        if missing or unexpected:
            raise TrainerError(
                TrainerReason.INVALID_CONFIG,
                f"checkpoint {source} does not fit this model (missing {missing[:3]}, unexpected "
                f"{unexpected[:3]}); the job's method or lora settings changed since it was written",
            )
        with torch.no_grad():
            for name, tensor in weights.items():
                model_params[name].copy_(tensor.to(model_params[name].device, model_params[name].dtype))
        optimizer.load_state_dict(torch.load(local / OPTIMIZER, weights_only=False))
        restore_rng(torch.load(local / RNG, weights_only=False))
        state = json.loads((local / STATE).read_text())
        return Restored(step=step, state=state, uri=str(source))

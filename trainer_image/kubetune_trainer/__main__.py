"""``python -m kubetune_trainer``: the trainer pod's entrypoint (config from $KUBETUNE_CONFIG)."""

from __future__ import annotations

import os
import sys


def _gpus_requested() -> int:
    from kubetune_trainer.config import config_path

    try:
        from kubetune_trainer.contract import TrainerConfig

        return TrainerConfig.from_json(config_path().read_text()).gpus
    except (OSError, ValueError, TypeError):
        return 0  # the recipe reports the unreadable config


def main() -> int:
    gpus = _gpus_requested()
    if gpus > 1 and "WORLD_SIZE" not in os.environ:
        import torch

        available = torch.cuda.device_count()
        if available > 1:
            # One process per GPU; accelerate sets up the process group and forwards SIGTERM to them.
            count = str(min(gpus, available))
            os.execvp(
                sys.executable,
                [
                    sys.executable,
                    "-m",
                    "accelerate.commands.launch",
                    "--multi_gpu",
                    "--num_processes",
                    count,
                    "--module",
                    "kubetune_trainer",
                ],
            )
    from kubetune_trainer.recipe import main as run_recipe

    return run_recipe()


if __name__ == "__main__":
    sys.exit(main())

"""``python -m kubetune_trainer``: the trainer pod's entrypoint (config from $KUBETUNE_CONFIG). One process
trains, or several under ``launch`` (one per GPU; see there for CPU). ``python -m kubetune_trainer validate``
is the validation pod: it checks and tokenizes the data and plans the run, on the CPU (see validate.py)."""

from __future__ import annotations

import os
import sys

VALIDATE_COMMAND = "validate"


def _gpus_requested() -> int:
    from kubetune_trainer.config import config_path

    try:
        from kubetune_trainer.contract import TrainerConfig

        return TrainerConfig.from_json(config_path().read_text()).gpus
    except (OSError, ValueError, TypeError):
        return 0  # the recipe reports the unreadable config


def main() -> int:
    from kubetune_trainer.redact import install_redaction

    install_redaction()
    if sys.argv[1:] == [VALIDATE_COMMAND]:
        from kubetune_trainer.validate import main as run_validation

        return run_validation()
    if "WORLD_SIZE" not in os.environ:  # not already one of several workers
        from kubetune_trainer import launch

        try:
            count, on_gpu = launch.plan_processes(_gpus_requested())
        except ValueError as err:
            return launch.invalid_setting(str(err))
        if count > 1:
            return launch.launch(count, on_gpu)
    from kubetune_trainer.recipe import main as run_recipe

    return run_recipe()


if __name__ == "__main__":
    sys.exit(main())

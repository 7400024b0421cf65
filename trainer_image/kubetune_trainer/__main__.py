"""``python -m kubetune_trainer``: the trainer pod's entrypoint (config from $KUBETUNE_CONFIG). One process
trains, or several under ``launch`` (one per GPU; see there for CPU), or, in a job of several pods, this pod's
share of the group under ``group``. ``python -m kubetune_trainer validate`` is the validation pod: it checks
and tokenizes the data and plans the run, on the CPU (see validate.py)."""

from __future__ import annotations

import os
import sys
from typing import Any

VALIDATE_COMMAND = "validate"


def _config() -> Any:
    from kubetune_trainer.config import config_path

    try:
        from kubetune_trainer.contract import TrainerConfig

        return TrainerConfig.from_json(config_path().read_text())
    except (OSError, ValueError, TypeError):
        return None  # the recipe reports the unreadable config


def main() -> int:
    from kubetune_trainer.redact import install_redaction

    install_redaction()
    if sys.argv[1:] == [VALIDATE_COMMAND]:
        from kubetune_trainer.validate import main as run_validation

        return run_validation()
    from kubetune_trainer import group, launch

    if "WORLD_SIZE" not in os.environ:  # not already one of several workers
        config = _config()
        try:
            settings = group.group_settings(os.environ)
            count, on_gpu = launch.plan_processes(config.gpus if config is not None else 0)
        except ValueError as err:
            return launch.invalid_setting(str(err))
        if settings is not None:
            if config is not None and group.finished_before(config, settings.node_rank):
                return 0
            run_id = f"kubetune-{config.job.uid or config.job.name}" if config is not None else "kubetune"
            return group.launch_group(settings, count, on_gpu, run_id)
        if count > 1:
            return launch.launch(count, on_gpu)
    else:
        try:
            group.adopt_worker_rank(os.environ)
        except ValueError as err:
            return launch.invalid_setting(str(err))
    from kubetune_trainer.recipe import main as run_recipe

    return run_recipe()


def finish(code: int) -> None:
    """Exit with ``code``. A worker whose peers vanished skips the interpreter's teardown, which would wait
    on the dead process group's connections; its report is already written."""
    from kubetune_trainer.errors import EXIT_PEER_LOST

    if code == EXIT_PEER_LOST and "WORLD_SIZE" in os.environ:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    finish(main())

"""Pure builders of the FineTuneJob's children: plain dicts, no I/O, no kopf."""

from kubetune_operator.builders.config_map import build_config_map, render_trainer_config
from kubetune_operator.builders.trainer_job import build_trainer_job, desired_suspend

__all__ = ["build_config_map", "build_trainer_job", "desired_suspend", "render_trainer_config"]

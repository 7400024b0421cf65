"""Pure builders of the FineTuneJob's children: plain dicts, no I/O, no kopf."""

from kubetune_operator.builders.config_map import build_config_map, render_trainer_config
from kubetune_operator.builders.service import build_trainer_service, is_multi_node
from kubetune_operator.builders.trainer_job import build_trainer_job, desired_suspend

__all__ = [
    "build_config_map",
    "build_trainer_job",
    "build_trainer_service",
    "desired_suspend",
    "is_multi_node",
    "render_trainer_config",
]

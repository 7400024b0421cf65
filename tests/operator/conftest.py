from __future__ import annotations

import pytest

from kubetune_operator.config import OperatorConfig


@pytest.fixture
def config() -> OperatorConfig:
    return OperatorConfig(
        trainer_image="registry.example/kubetune/trainer:test",
        default_s3_endpoint="http://s3.default:9000",
        gpu_resource_name="nvidia.com/gpu",
        scrape_interval_seconds=10,
    )

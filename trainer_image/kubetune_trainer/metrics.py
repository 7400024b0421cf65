"""Live progress: Prometheus gauges on $POD_IP:9090 (the operator scrapes them) and one JSON line per log
interval on stdout (the same values, for `kubectl logs`)."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from kubetune_trainer import contract

GAUGES = {
    "step": (contract.METRIC_STEP, "Optimizer steps completed"),
    "total_steps": (contract.METRIC_TOTAL_STEPS, "Optimizer steps planned for the run"),
    "epoch": (contract.METRIC_EPOCH, "Epochs completed, fractional"),
    "train_loss": (contract.METRIC_TRAIN_LOSS, "Training loss of the last step (mean over label tokens)"),
    "eval_loss": (contract.METRIC_EVAL_LOSS, "Loss on the validation set at the last evaluation"),
    "best_eval_loss": (contract.METRIC_BEST_EVAL_LOSS, "Lowest validation loss so far"),
    "best_step": (contract.METRIC_BEST_STEP, "Step of the lowest validation loss"),
    "learning_rate": (contract.METRIC_LEARNING_RATE, "Learning rate of the last step"),
    "grad_norm": (contract.METRIC_GRAD_NORM, "Gradient norm of the last step, before clipping"),
    "tokens_per_second": (
        contract.METRIC_TOKENS_PER_SECOND,
        "Trained tokens per second over the last interval",
    ),
    "trained_tokens": (
        contract.METRIC_TRAINED_TOKENS,
        "Tokens trained on so far (this run and resumed ones)",
    ),
    "eta_seconds": (contract.METRIC_ETA_SECONDS, "Estimated seconds until the last step"),
    "eval_token_accuracy": (
        contract.METRIC_EVAL_TOKEN_ACCURACY,
        "Share of the validation set's label tokens predicted exactly (arg-max), at the last evaluation",
    ),
    # Preference tuning (DPO) only; means per pair.
    "reward_margin": (
        contract.METRIC_REWARD_MARGIN,
        "Chosen minus rejected implicit reward, beta * log(policy / reference), over the last step's pairs",
    ),
    "preference_accuracy": (
        contract.METRIC_PREFERENCE_ACCURACY,
        "Share of the last step's pairs whose chosen answer out-rewards the rejected one (ties count 1/2)",
    ),
    "chosen_logps": (
        contract.METRIC_CHOSEN_LOGPS,
        "Policy log-probability of the chosen answers (last step)",
    ),
    "rejected_logps": (
        contract.METRIC_REJECTED_LOGPS,
        "Policy log-probability of the rejected answers (last step)",
    ),
    "eval_reward_margin": (contract.METRIC_EVAL_REWARD_MARGIN, "Reward margin on the validation pairs"),
    "eval_preference_accuracy": (
        contract.METRIC_EVAL_PREFERENCE_ACCURACY,
        "Preference accuracy on the validation pairs",
    ),
}


def log_event(event: str, every_rank: bool = False, **fields: Any) -> None:
    """One JSON line on stdout. When several processes train, only rank 0 logs (the others would repeat
    it), except events marked ``every_rank``, which carry the rank."""
    rank = os.environ.get("RANK", "0")
    if rank != "0" and not every_rank:
        return
    record = {"ts": round(time.time(), 3), "event": event, **fields}
    if "WORLD_SIZE" in os.environ:
        record["rank"] = int(rank)
    sys.stdout.write(json.dumps(record, default=str) + "\n")
    sys.stdout.flush()


class Metrics:
    """Gauges in a registry of their own (one per run, so runs in one process never collide)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Gauge

        self.registry = CollectorRegistry()
        self.gauges = {key: Gauge(name, doc, registry=self.registry) for key, (name, doc) in GAUGES.items()}
        self._server: Any = None
        self.port: int | None = None

    def serve(self, port: int) -> None:
        """Serve /metrics on $POD_IP (0.0.0.0 without it); port 0 picks a free one."""
        from prometheus_client import start_http_server

        address = os.environ.get("POD_IP") or "0.0.0.0"
        server, _thread = start_http_server(port, addr=address, registry=self.registry)
        self._server = server
        self.port = int(server.server_address[1])

    def set(self, **values: float | None) -> None:
        for key, value in values.items():
            if value is None:
                continue
            self.gauges[key].set(float(value))

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

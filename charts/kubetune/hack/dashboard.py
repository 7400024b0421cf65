"""Write files/dashboard.json, the Grafana dashboard the chart ships. Run after changing a panel:
python charts/kubetune/hack/dashboard.py (tests/chart checks the queries name metrics that exist)."""

import json
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "files" / "dashboard.json"
JOBS_BY_PHASE = "kubetune_operator_finetunejobs"
TIME_TO_START = "kubetune_operator_time_to_trainer_start_seconds"
QUEUE_DEPTH = "kubetune_operator_workqueue_depth"
SCRAPE_ROUND = "kubetune_operator_scrape_round_duration_seconds"
# Per-job gauges the operator serves from the status it writes (need only the ServiceMonitor) ...
JOB_TRAIN_LOSS = "kubetune_finetunejob_train_loss"
JOB_TOKENS_PER_SECOND = "kubetune_finetunejob_tokens_per_second"
# ... and the trainer pods' own series (need the PodMonitor, which adds the `finetunejob` label).
TRAIN_LOSS = "kubetune_trainer_train_loss"
EVAL_LOSS = "kubetune_trainer_eval_loss"
LEARNING_RATE = "kubetune_trainer_learning_rate"
STEP = "kubetune_trainer_step"
TOTAL_STEPS = "kubetune_trainer_total_steps"
JOB = "{{namespace}}/{{name}}"
TRAINER_JOB = "{{namespace}}/{{finetunejob}}"


def panel(pid, title, kind, grid, targets, unit="short", description="", overrides=()):
    return {
        "id": pid, "title": title, "type": kind, "description": description,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": dict(zip(("x", "y", "w", "h"), grid, strict=True)),
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": list(overrides)},
        "targets": [{"refId": chr(65 + i), "expr": expr, "legendFormat": legend}
                    for i, (expr, legend) in enumerate(targets)],
    }


panels = [
    panel(1, "FineTuneJobs by phase", "bargauge", (0, 0, 8, 8),
          [(f'sum by (phase) ({JOBS_BY_PHASE}{{namespace=~"$namespace"}})', "{{phase}}")],
          description="FineTuneJobs the operator sees, by status.phase."),
    panel(2, "Time to start", "timeseries", (8, 0, 8, 8),
          [(f'histogram_quantile(0.5, sum by (le) (rate({TIME_TO_START}_bucket[$__rate_interval])))', "p50"),
           (f'histogram_quantile(0.95, sum by (le) (rate({TIME_TO_START}_bucket[$__rate_interval])))', "p95")],
          unit="s", description="From FineTuneJob creation to its trainer container running."),
    panel(3, "Training progress", "bargauge", (16, 0, 8, 8),
          [(f'100 * {STEP}{{namespace=~"$namespace"}} / {TOTAL_STEPS}{{namespace=~"$namespace"}}', TRAINER_JOB)],
          unit="percent", description="From the trainer pods (podMonitor.enabled)."),
    panel(4, "Training loss", "timeseries", (0, 8, 12, 9),
          [(f'{JOB_TRAIN_LOSS}{{namespace=~"$namespace", name=~"$finetunejob"}}', JOB)],
          description="Latest training loss of each FineTuneJob, as the operator last wrote it to the status."),
    panel(5, "Loss curves", "timeseries", (12, 8, 12, 9),
          [(f'{TRAIN_LOSS}{{namespace=~"$namespace", finetunejob=~"$finetunejob"}}', f"train {TRAINER_JOB}"),
           (f'{EVAL_LOSS}{{namespace=~"$namespace", finetunejob=~"$finetunejob"}}', f"eval {TRAINER_JOB}"),
           (f'{LEARNING_RATE}{{namespace=~"$namespace", finetunejob=~"$finetunejob"}}', f"lr {TRAINER_JOB}")],
          description="Train and eval loss with the learning rate on the right axis, from the trainer pods "
                      "(podMonitor.enabled): the curves `kubectl finetune plot` draws from status.history.",
          overrides=[{"matcher": {"id": "byFrameRefID", "options": "C"},
                      "properties": [{"id": "custom.axisPlacement", "value": "right"},
                                     {"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}},
                                     {"id": "unit", "value": "sci"}]}]),
    panel(6, "Tokens per second", "timeseries", (0, 17, 24, 8),
          [(f'{JOB_TOKENS_PER_SECOND}{{namespace=~"$namespace", name=~"$finetunejob"}}', JOB)],
          description="Non-padding tokens trained per second, per FineTuneJob."),
    panel(7, "Work-queue depth", "timeseries", (0, 25, 12, 8),
          [(f"max({QUEUE_DEPTH})", "waiting")],
          description="FineTuneJobs waiting for a reconcile pass requested by a trainer Job or pod event."),
    panel(8, "Scrape round duration", "timeseries", (12, 25, 12, 8),
          [(f'histogram_quantile(0.95, sum by (le) (rate({SCRAPE_ROUND}_bucket[$__rate_interval])))', "p95")],
          unit="s", description="Time to scrape every running trainer once. Above the scrape interval, the "
          "operator cannot keep up: raise scrapeConcurrency."),
]


def variable(name, query):
    return {"name": name, "type": "query", "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "query": {"query": query, "refId": name}, "includeAll": True, "multi": True,
            "current": {"text": "All", "value": "$__all"}, "refresh": 2}


dashboard = {
    "title": "kubetune",
    "uid": "kubetune",
    "tags": ["kubetune", "fine-tuning"],
    "schemaVersion": 39,
    "editable": True,
    "time": {"from": "now-6h", "to": "now"},
    "refresh": "30s",
    "templating": {"list": [
        {"name": "datasource", "type": "datasource", "query": "prometheus"},
        variable("namespace", f"label_values({JOB_TRAIN_LOSS}, namespace)"),
        variable("finetunejob", f'label_values({JOB_TRAIN_LOSS}{{namespace=~"$namespace"}}, name)'),
    ]},
    "panels": panels,
}

OUT.write_text(json.dumps(dashboard, indent=2) + "\n")
print(OUT)

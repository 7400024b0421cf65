"""What the plugin shows of a FineTuneJob, read from the object kubectl returns.

The object is untrusted input (a status can be edited by anyone allowed to): every field is read with a type
check and a missing or malformed one shows as "-", never as a crash.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from kubetune_cli import chart

NONE = "-"
TERMINAL_PHASES = ("Succeeded", "Failed")


def obj_at(obj: Any, *path: str) -> Any:
    """obj[path[0]][path[1]]...; None where a step is missing or not an object."""
    for key in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def text_at(obj: Any, *path: str) -> str | None:
    value = obj_at(obj, *path)
    return value if isinstance(value, str) and value else None


def number_at(obj: Any, *path: str) -> float | None:
    value = obj_at(obj, *path)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def numbers(value: Any) -> list[float]:
    """A list of finite numbers; anything else in it ends the list there."""
    out: list[float] = []
    for item in value if isinstance(value, list) else []:
        if isinstance(item, bool) or not isinstance(item, int | float) or not math.isfinite(item):
            break
        out.append(float(item))
    return out


@dataclass(frozen=True)
class Curves:
    """status.history as two series: train (step, loss, learning rate) and eval (step, loss)."""

    train_steps: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    learning_rate: list[float] = field(default_factory=list)
    eval_steps: list[float] = field(default_factory=list)
    eval_loss: list[float] = field(default_factory=list)

    @classmethod
    def from_job(cls, job: dict[str, Any]) -> Curves:
        history = obj_at(job, "status", "history")
        steps, losses = numbers(obj_at(history, "step")), numbers(obj_at(history, "trainLoss"))
        lrs = numbers(obj_at(history, "learningRate"))
        n = min(len(steps), len(losses))
        eval_steps, eval_losses = numbers(obj_at(history, "evalStep")), numbers(obj_at(history, "evalLoss"))
        m = min(len(eval_steps), len(eval_losses))
        return cls(steps[:n], losses[:n], lrs[: min(n, len(lrs))], eval_steps[:m], eval_losses[:m])

    def empty(self) -> bool:
        return not self.train_steps and not self.eval_steps


def phase(job: dict[str, Any]) -> str:
    return text_at(job, "status", "phase") or "Pending"


def condition(job: dict[str, Any], type_: str) -> dict[str, Any] | None:
    conditions = obj_at(job, "status", "conditions")
    for item in conditions if isinstance(conditions, list) else []:
        if isinstance(item, dict) and item.get("type") == type_:
            return item
    return None


def is_true(job: dict[str, Any], type_: str) -> bool:
    found = condition(job, type_)
    return found is not None and found.get("status") == "True"


# --- list -------------------------------------------------------------------------------------------------


def list_rows(jobs: list[dict[str, Any]], now: datetime, with_namespace: bool) -> list[list[str]]:
    header = ["NAME", "PHASE", "METHOD", "MODEL", "PROGRESS", "ETA", "LOSS", "AGE"]
    rows = [(["NAMESPACE"] if with_namespace else []) + header]
    ordered = sorted(jobs, key=lambda j: (text_at(j, "metadata", "namespace") or "", name_of(j)))
    for job in ordered:
        row = [
            name_of(job),
            phase(job),
            text_at(job, "spec", "method") or NONE,
            short_model(text_at(job, "spec", "baseModel", "uri")),
            progress_text(job),
            eta_text(job),
            loss_text(job),
            duration(age_seconds(text_at(job, "metadata", "creationTimestamp"), now)),
        ]
        rows.append(([text_at(job, "metadata", "namespace") or NONE] if with_namespace else []) + row)
    return rows


def table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "   ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def name_of(job: dict[str, Any]) -> str:
    return text_at(job, "metadata", "name") or NONE


def short_model(uri: str | None) -> str:
    """The last path element of the base model URI (s3://models/llama-3.2-1b/ -> llama-3.2-1b)."""
    if not uri:
        return NONE
    tail = uri.rstrip("/").rsplit("/", 1)[-1]
    return tail or uri


def progress_text(job: dict[str, Any]) -> str:
    step, total = (
        number_at(job, "status", "progress", "step"),
        number_at(job, "status", "progress", "totalSteps"),
    )
    percent = number_at(job, "status", "progress", "percent")
    if step is None:
        return NONE
    text = f"{int(step)}/{int(total)}" if total else f"{int(step)}"
    return f"{text} {percent:.0f}%" if percent is not None else text


def eta_text(job: dict[str, Any]) -> str:
    if phase(job) in TERMINAL_PHASES:
        return NONE
    return duration(number_at(job, "status", "progress", "etaSeconds"))


def loss_text(job: dict[str, Any]) -> str:
    train = number_at(job, "status", "metrics", "trainLoss")
    evaluation = number_at(job, "status", "metrics", "evalLoss")
    if train is None and evaluation is None:
        return NONE
    parts = [f"{train:.4g}" if train is not None else NONE]
    if evaluation is not None:
        parts.append(f"eval {evaluation:.4g}")
    return " ".join(parts)


def duration(seconds: float | None) -> str:
    """kubectl's style: 45s, 3m12s, 2h5m, 3d4h."""
    if seconds is None or seconds < 0:
        return NONE
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60}s" if s % 60 else f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60}m" if s % 3600 // 60 else f"{s // 3600}h"
    return f"{s // 86400}d{s % 86400 // 3600}h" if s % 86400 // 3600 else f"{s // 86400}d"


def parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def age_seconds(timestamp: str | None, now: datetime) -> float | None:
    when = parse_time(timestamp)
    return (now - when).total_seconds() if when is not None else None


def now_utc() -> datetime:
    return datetime.now(UTC)


# --- describe ---------------------------------------------------------------------------------------------


def describe(job: dict[str, Any], now: datetime, width: int = 80, color: bool = False) -> str:
    status = obj_at(job, "status") or {}
    preferences = _preferences_line(job)  # DPO only
    lines = [
        f"Name:         {name_of(job)}",
        f"Namespace:    {text_at(job, 'metadata', 'namespace') or NONE}",
        f"Phase:        {phase(job)}"
        + (f"  ({status.get('message')})" if text_at(status, "message") else ""),
        f"Method:       {text_at(job, 'spec', 'method') or NONE}",
        f"Base model:   {text_at(job, 'spec', 'baseModel', 'uri') or NONE}",
        f"Dataset:      {text_at(job, 'spec', 'dataset', 'train') or NONE}",
        f"Output:       {text_at(job, 'spec', 'output', 'uri') or NONE}",
        f"Progress:     {_progress_line(job)}",
        f"Metrics:      {_metrics_line(job)}",
        *([f"Preferences:  {preferences}"] if preferences != NONE else []),
        f"Started:      {text_at(status, 'startTime') or NONE}",
        f"Completed:    {text_at(status, 'completionTime') or NONE}",
        f"Restarts:     {int(number_at(status, 'restarts') or 0)}",
        f"Trainer Job:  {text_at(status, 'trainerJob') or NONE}",
        "",
        "Conditions:",
        *_conditions(job, now),
    ]
    plan = obj_at(status, "plan")
    if isinstance(plan, dict) and plan:
        lines += ["", "Plan (an estimate):", *_key_values(plan)]
    for kind in ("adapter", "model"):
        record = obj_at(status, kind)
        if isinstance(record, dict) and record:
            lines += ["", f"{kind.capitalize()}:", *_artifact(record)]
    checkpoint = obj_at(status, "checkpoint")
    if isinstance(checkpoint, dict) and text_at(checkpoint, "uri"):
        step = number_at(checkpoint, "step")
        lines += ["", f"Checkpoint:   {checkpoint['uri']} (step {int(step) if step is not None else NONE})"]
    curves = Curves.from_job(job)
    lines += ["", "Loss history:"]
    if curves.empty():
        lines.append("  (no points yet: the operator records them from the trainer's metrics)")
    else:
        lines += [
            "  " + line
            for line in chart.render(
                [
                    chart.Series("train loss", curves.train_steps, curves.train_loss, "*", chart.BLUE),
                    chart.Series("eval loss", curves.eval_steps, curves.eval_loss, "o", chart.RED, "."),
                ],
                width=max(40, width - 2),
                height=12,
                color=color,
            )
        ]
    return "\n".join(lines)


def _progress_line(job: dict[str, Any]) -> str:
    parts = [f"step {progress_text(job)}"] if progress_text(job) != NONE else []
    epoch = number_at(job, "status", "progress", "epoch")
    if epoch is not None:
        parts.append(f"epoch {epoch:g}")
    speed = number_at(job, "status", "progress", "tokensPerSecond")
    if speed is not None:
        parts.append(f"{speed:,.0f} tokens/s")
    if eta_text(job) != NONE:
        parts.append(f"ETA {eta_text(job)}")
    return ", ".join(parts) or NONE


def _metrics_line(job: dict[str, Any]) -> str:
    names = [
        ("trainLoss", "train loss"),
        ("evalLoss", "eval loss"),
        ("evalTokenAccuracy", "eval token accuracy"),
        ("learningRate", "lr"),
        ("gradNorm", "grad norm"),
    ]
    parts = [
        f"{label} {value:.4g}"
        for key, label in names
        if (value := number_at(job, "status", "metrics", key)) is not None
    ]
    best = number_at(job, "status", "metrics", "bestEvalLoss")
    best_step = number_at(job, "status", "metrics", "bestStep")
    if best is not None:
        parts.append(
            f"best eval {best:.4g}" + (f" at step {int(best_step)}" if best_step is not None else "")
        )
    return ", ".join(parts) or NONE


def _preferences_line(job: dict[str, Any]) -> str:
    """DPO's metrics: reward margin and preference accuracy (train, eval), the answers' log-probabilities."""
    names = [
        ("rewardMargin", "reward margin"),
        ("preferenceAccuracy", "accuracy"),
        ("evalRewardMargin", "eval margin"),
        ("evalPreferenceAccuracy", "eval accuracy"),
        ("chosenLogps", "logp chosen"),
        ("rejectedLogps", "rejected"),
    ]
    parts = [
        f"{label} {value:.4g}"
        for key, label in names
        if (value := number_at(job, "status", "metrics", key)) is not None
    ]
    return ", ".join(parts) or NONE


def _conditions(job: dict[str, Any], now: datetime) -> list[str]:
    conditions = obj_at(job, "status", "conditions")
    rows = [["  TYPE", "STATUS", "REASON", "AGE", "MESSAGE"]]
    for item in conditions if isinstance(conditions, list) else []:
        if not isinstance(item, dict):
            continue
        rows.append(
            [
                "  " + str(item.get("type") or NONE),
                str(item.get("status") or NONE),
                str(item.get("reason") or NONE),
                duration(age_seconds(text_at(item, "lastTransitionTime"), now)),
                str(item.get("message") or ""),
            ]
        )
    return table(rows).splitlines() if len(rows) > 1 else ["  (none yet)"]


def _artifact(record: dict[str, Any]) -> list[str]:
    files = record.get("files")
    size = number_at(record, "sizeBytes")
    return [
        f"  URI:        {text_at(record, 'uri') or NONE}",
        f"  Files:      {', '.join(str(f) for f in files) if isinstance(files, list) and files else NONE}",
        f"  Size:       {_size(size) if size is not None else NONE}",
        f"  SHA-256:    {text_at(record, 'sha256') or NONE}",
        f"  Base model: {text_at(record, 'baseModel') or NONE}",
        f"  Weights:    {_selected(record)}",
    ]


def _selected(record: dict[str, Any]) -> str:
    """Which step's weights the result holds (spec.output.select), as status.<kind>.selected says."""
    step = number_at(record, "selected", "step")
    if step is None:
        return NONE
    loss = number_at(record, "selected", "evalLoss")
    how = text_at(record, "selected", "select") or NONE
    return f"step {int(step)} ({how}" + (f", eval loss {loss:.4g})" if loss is not None else ")")


def _key_values(obj: dict[str, Any], indent: str = "  ") -> list[str]:
    lines = []
    for key, value in obj.items():
        if isinstance(value, dict):
            lines.append(f"{indent}{key}:")
            lines += _key_values(value, indent + "  ")
        else:
            lines.append(f"{indent}{key}: {value}")
    return lines


def _size(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"

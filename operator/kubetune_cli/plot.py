"""`kubectl finetune plot`: the loss curves as a PNG, the learning rate on a second axis."""

from __future__ import annotations

from pathlib import Path

from kubetune_cli.job_view import Curves
from kubetune_cli.kubectl import CliError

TRAIN_COLOR = "#1f77b4"
EVAL_COLOR = "#d62728"
LEARNING_RATE_COLOR = "#2ca02c"


def write_png(curves: Curves, title: str, path: Path) -> None:
    """Train and eval loss against the step (left axis), learning rate dashed (right axis)."""
    if curves.empty():
        raise CliError(
            f"{title} has no loss history yet: the operator records it from the trainer's metrics once "
            "training has started; try again later",
            exit_code=1,
        )
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot
    except ImportError as exc:
        raise CliError(f"`plot` needs matplotlib ({exc}); install it with `pip install matplotlib`") from exc

    figure, loss_axis = pyplot.subplots(figsize=(9, 5), dpi=100)
    try:
        if curves.train_steps:
            loss_axis.plot(
                curves.train_steps, curves.train_loss, color=TRAIN_COLOR, linewidth=2.5, label="train loss"
            )
        if curves.eval_steps:
            loss_axis.plot(
                curves.eval_steps,
                curves.eval_loss,
                color=EVAL_COLOR,
                linewidth=2.5,
                marker="o",
                label="eval loss",
            )
        loss_axis.set_xlabel("step")
        loss_axis.set_ylabel("loss")
        loss_axis.grid(alpha=0.3)
        handles, labels = loss_axis.get_legend_handles_labels()
        if curves.learning_rate:
            lr_axis = loss_axis.twinx()
            n = len(curves.learning_rate)
            lr_axis.plot(
                curves.train_steps[:n],
                curves.learning_rate,
                color=LEARNING_RATE_COLOR,
                linewidth=1.2,
                linestyle="--",
                label="learning rate",
            )
            lr_axis.set_ylabel("learning rate")
            lr_axis.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
            more_handles, more_labels = lr_axis.get_legend_handles_labels()
            handles, labels = handles + more_handles, labels + more_labels
        loss_axis.legend(handles, labels, loc="upper right")
        loss_axis.set_title(title)
        figure.tight_layout()
        try:
            figure.savefig(path, format="png")
        except OSError as exc:
            raise CliError(f"cannot write {path}: {exc}") from exc
    finally:
        pyplot.close(figure)

"""Command line of `kubectl finetune` (installed as the `kubectl-finetune` executable)."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kubetune_cli import job_view, logs, plot
from kubetune_cli.job_view import condition, is_true, text_at
from kubetune_cli.kubectl import RESOURCE, CliError, Kubectl

EXIT_SUCCEEDED, EXIT_FAILED, EXIT_ERROR = 0, 1, 2
WAIT_POLL_SECONDS = 2.0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    kubectl = Kubectl(
        kubeconfig=getattr(args, "kubeconfig", None),
        context=getattr(args, "context", None),
        namespace=getattr(args, "namespace", None),
        all_namespaces=bool(getattr(args, "all_namespaces", False)),
    )
    command: Callable[[Kubectl, argparse.Namespace], int] = args.run
    try:
        return command(kubectl, args)
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `... | head`
        return 0


# --- commands ---------------------------------------------------------------------------------------------


def list_jobs(kubectl: Kubectl, args: argparse.Namespace) -> int:
    jobs = kubectl.jobs()
    if not jobs:
        where = "any namespace" if kubectl.all_namespaces else f"namespace {kubectl.namespace or '(current)'}"
        print(f"No FineTuneJobs found in {where}.")
        return 0
    print(job_view.table(job_view.list_rows(jobs, job_view.now_utc(), kubectl.all_namespaces)))
    return 0


def describe(kubectl: Kubectl, args: argparse.Namespace) -> int:
    job = kubectl.job(args.name)
    width = shutil.get_terminal_size((100, 24)).columns
    print(job_view.describe(job, job_view.now_utc(), width=min(width, 120), color=sys.stdout.isatty()))
    return 0


def show_logs(kubectl: Kubectl, args: argparse.Namespace) -> int:
    if args.rank is not None and args.rank < 0:
        raise CliError(f"--rank {args.rank}: a rank is 0 or more")
    job = kubectl.job(args.name)
    pod = logs.trainer_pod(kubectl, job, args.rank)
    logs.write_lines(logs.stream_log(kubectl, pod, args.follow, args.rank))
    return 0


def plot_job(kubectl: Kubectl, args: argparse.Namespace) -> int:
    job = kubectl.job(args.name)
    name = f"{text_at(job, 'metadata', 'namespace')}/{text_at(job, 'metadata', 'name')}"
    output = Path(args.output or f"{args.name}-loss.png")
    plot.write_png(job_view.Curves.from_job(job), f"FineTuneJob {name}", output)
    print(f"wrote {output}")
    return 0


def wait(kubectl: Kubectl, args: argparse.Namespace) -> int:
    deadline = time.monotonic() + args.timeout if args.timeout else None
    while True:
        job = kubectl.job(args.name)
        if is_true(job, "Succeeded"):
            print(f"{args.name} succeeded: {_message(job, 'Succeeded')}")
            return EXIT_SUCCEEDED
        if is_true(job, "Failed"):
            found = condition(job, "Failed") or {}
            print(
                f"{args.name} failed ({found.get('reason') or 'unknown reason'}): {_message(job, 'Failed')}"
            )
            return EXIT_FAILED
        if deadline is not None and time.monotonic() >= deadline:
            raise CliError(
                f"{args.name} is still {job_view.phase(job)} after {job_view.duration(args.timeout)}; "
                "wait longer with --timeout, or look at `kubectl finetune describe` for why",
            )
        time.sleep(WAIT_POLL_SECONDS)


def set_suspend(suspend: bool) -> Callable[[Kubectl, argparse.Namespace], int]:
    def run(kubectl: Kubectl, args: argparse.Namespace) -> int:
        job = kubectl.job(args.name)
        _refuse_if_finished(job, "suspend" if suspend else "resume")
        patch = json.dumps({"spec": {"suspend": suspend}})
        kubectl.run("patch", RESOURCE, args.name, "--type=merge", f"--patch={patch}")
        if suspend:
            print(f"{args.name} suspended: the trainer stops (saving a checkpoint) and releases its GPUs")
        else:
            print(f"{args.name} resumed: training continues from the newest checkpoint")
        return 0

    return run


def cancel(kubectl: Kubectl, args: argparse.Namespace) -> int:
    job = kubectl.job(args.name)
    output = text_at(job, "spec", "output", "uri")
    kubectl.run("delete", RESOURCE, args.name, "--wait=false")
    print(f"{args.name} cancelled: the FineTuneJob is deleted, and its trainer Job and pods with it.")
    if output:
        print(f"Anything already written under {output} (checkpoints, an adapter) stays in object storage.")
    return 0


# --- helpers ----------------------------------------------------------------------------------------------


def _message(job: dict[str, Any], type_: str) -> str:
    found = condition(job, type_) or {}
    return str(found.get("message") or "")


def _refuse_if_finished(job: dict[str, Any], verb: str) -> None:
    phase = job_view.phase(job)
    if phase in job_view.TERMINAL_PHASES:
        raise CliError(
            f"{text_at(job, 'metadata', 'name')} has already {phase.lower()}; there is nothing to {verb} "
            "(a finished FineTuneJob never trains again: create a new one)",
            exit_code=1,
        )


def parse_duration(text: str) -> float:
    """30, 30s, 10m, 2h, 1h30m -> seconds."""
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)([smhd])", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 90s, 10m or 2h")
    scale = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    return sum(float(n) * scale[u] for n, u in parts)


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: the options may come before or after the subcommand without one overwriting the other.
    common.add_argument("-n", "--namespace", default=argparse.SUPPRESS, help="namespace of the job(s)")
    common.add_argument("--context", default=argparse.SUPPRESS, help="kubeconfig context to use")
    common.add_argument("--kubeconfig", default=argparse.SUPPRESS, help="path to the kubeconfig file")
    parser = argparse.ArgumentParser(
        prog="kubectl finetune",
        description="See and steer kubetune FineTuneJobs: progress, loss curves, logs.",
        parents=[common],
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, run: Callable[[Kubectl, argparse.Namespace], int], summary: str) -> Any:
        sub = commands.add_parser(name, parents=[common], help=summary, description=summary)
        sub.set_defaults(run=run)
        return sub

    listing = command("list", list_jobs, "list FineTuneJobs: phase, method, model, progress, ETA, loss")
    listing.add_argument(
        "-A", "--all-namespaces", action="store_true", default=argparse.SUPPRESS, help="in every namespace"
    )
    command("describe", describe, "conditions, plan, adapter and a chart of the loss history").add_argument(
        "name"
    )
    log = command("logs", show_logs, "the trainer pod's log")
    log.add_argument("name")
    log.add_argument("-f", "--follow", action="store_true", help="keep printing until the pod ends")
    log.add_argument("--rank", type=int, default=None, help="only this training process's lines")
    drawing = command("plot", plot_job, "write the loss curves (and learning rate) as a PNG")
    drawing.add_argument("name")
    drawing.add_argument("-o", "--output", default=None, help="PNG file to write (default NAME-loss.png)")
    waiting = command("wait", wait, "wait until the job ends: exit 0 if it succeeded, 1 if it failed")
    waiting.add_argument("name")
    waiting.add_argument("--timeout", type=parse_duration, default=None, help="give up after this (exit 2)")
    command("suspend", set_suspend(True), "stop training and free the GPUs (spec.suspend=true)").add_argument(
        "name"
    )
    command("resume", set_suspend(False), "continue a suspended job from its checkpoint").add_argument("name")
    command("cancel", cancel, "stop the job for good: delete the FineTuneJob").add_argument("name")
    return parser

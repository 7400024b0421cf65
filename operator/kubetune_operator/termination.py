"""Reading a trainer pod's termination message: untrusted input from whatever image the pod ran.

The message is either the trainer's JSON summary (the contract's ``TerminationSummary``, typed and size
limited) or, because the container's ``terminationMessagePolicy`` is ``FallbackToLogsOnError``, the tail of
the log of a container that crashed before writing one. Nothing from it reaches status or an Event unchecked:
summaries are parsed with every field's type enforced, reasons outside the documented set are not copied, and
log tails pass through ``redact`` first.
"""

from __future__ import annotations

import re

from kubetune_operator import labels, observed
from kubetune_operator.conditions import TRAINER_REASONS
from kubetune_operator.observed import Obj
from kubetune_trainer import contract
from kubetune_trainer.contract import AdapterRecord, ContractError, TerminationSummary

LOG_TAIL_LIMIT = 400
"""Characters of a crashed container's log tail kept in a message (the end, where the error is)."""

_CREDENTIAL_ASSIGNMENT = re.compile(
    # A key whose last segment names a credential (AWS_SECRET_ACCESS_KEY, api_key, session-token, password),
    # then = or : (or a JSON "key": "value"), then the value. tokens_per_second or key_count are left alone.
    r"(?i)\b((?:[a-z0-9]+[_.-])*(?:secret|token|password|passwd|pwd|credentials?|key|apikey|auth|"
    r"authorization))(\s*[=:]\s*|\"\s*:\s*\")([^\s\"',;]+)"
)
_AWS_ACCESS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")
_BEARER = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}")
_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s:@]+:[^/\s@]+@")
REDACTED = "<redacted>"


def redact(text: str) -> str:
    """``text`` with credential-looking values replaced: ``key=value`` / ``key: value`` pairs whose key
    names a secret, token, password or key; AWS access key ids; bearer/basic tokens; user:pass@ in URLs."""
    text = _BEARER.sub(lambda m: f"{m.group(1)} {REDACTED}", text)
    text = _CREDENTIAL_ASSIGNMENT.sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", text)
    text = _AWS_ACCESS_KEY_ID.sub(REDACTED, text)
    return _URL_USERINFO.sub(lambda m: f"{m.group(1)}{REDACTED}@", text)


def read_summary(pod: Obj | None) -> tuple[TerminationSummary | None, str]:
    """The trainer's termination summary from this pod, or None and why there is none (one line)."""
    if pod is None:
        return None, "no trainer pod is left to read"
    text = (observed.terminated_state(pod) or {}).get("message")
    name = observed.pod_name(pod)
    if not text:
        return None, f"pod {name} has no termination message"
    if not isinstance(text, str):
        return None, f"the termination message of pod {name} is not text"
    try:
        return TerminationSummary.from_json(text), ""
    except ContractError as err:
        return None, f"the termination message of pod {name} is not a valid kubetune summary: {err}"


def documented_failure(summary: TerminationSummary | None) -> str | None:
    """The summary's failure reason when it is one the trainer documents (never Interrupted); else None, and
    the caller reports TrainerFailed instead of copying an unknown word onto the FineTuneJob."""
    if summary is None or summary.reason not in TRAINER_REASONS:
        return None
    return summary.reason


def result_record(summary: TerminationSummary | None, problem: str) -> tuple[AdapterRecord | None, str]:
    """The result record a successful trainer must leave, or None and what was missing."""
    if summary is None:
        return None, problem
    if summary.outcome != "Succeeded":
        return None, f"the trainer's summary says {summary.outcome} ({summary.reason or 'no reason'})"
    if summary.adapter is None:
        return None, "the trainer's summary has no result record (adapter)"
    missing = summary.adapter.missing()
    if missing:
        return None, f"the trainer's result record is incomplete: {'; '.join(missing)}"
    return summary.adapter, ""


def interrupted(pod: Obj) -> bool:
    """The trainer was stopped from outside and said so (or exited as SIGTERM makes it exit)."""
    summary, _ = read_summary(pod)
    if summary is not None:
        return summary.reason == contract.TrainerReason.INTERRUPTED
    terminated = observed.terminated_state(pod) or {}
    return terminated.get("exitCode") == contract.EXIT_CODE_INTERRUPTED


def attempt_detail(pod: Obj) -> str:
    """One line about how a trainer pod ended: the trainer's own reason if it wrote a valid summary, else the
    exit and the redacted end of the log the container left as its termination message."""
    summary, problem = read_summary(pod)
    if summary is not None and summary.reason:
        known = summary.reason in TRAINER_REASONS or summary.reason == contract.TrainerReason.INTERRUPTED
        reason = summary.reason if known else "unknown reason"
        text = f"{reason}: {summary.message}" if summary.message else reason
        return redact(text)
    if observed.was_disrupted(pod):
        return f"pod {observed.pod_name(pod)} was preempted or evicted"
    terminated = observed.terminated_state(pod)
    if terminated is None:
        reason = ((pod.get("status") or {}).get("reason")) or "unknown"
        return f"pod {observed.pod_name(pod)} failed ({reason})"
    parts = [f"exit code {terminated.get('exitCode')}"]
    if terminated.get("reason"):
        parts.append(str(terminated["reason"]))
    text = f"container trainer ended with {', '.join(parts)}"
    tail = str(terminated.get("message") or "").strip()
    if tail.startswith("{") and "valid kubetune summary" in problem:
        return f"{text}; {problem}"
    return f"{text}: {redact(tail[-LOG_TAIL_LIMIT:])}" if tail else text


def releasable_pods(pods: tuple[Obj, ...], *, finished: bool) -> list[Obj]:
    """Pods still holding labels.RESULT_FINALIZER whose termination message nothing needs any more, once a
    pass has written what it saw into status: all of them when the job is finished; otherwise an ended pod
    that a newer attempt has replaced, one stopped from outside (its checkpoint is recorded, and the Job's
    failure policy ignores it), and a pod deleted before its container ran. The newest ended attempt keeps
    its result until the job's outcome is recorded, because it may be the one that decides it; in a
    multi-node group, the newest ended attempt of each completion index (index 0's holds the result)."""
    held = [p for p in pods if labels.RESULT_FINALIZER in ((p.get("metadata") or {}).get("finalizers") or [])]
    if finished:
        return held
    newest = {
        index: observed.newest_pod(tuple(p for p in pods if observed.completion_index(p) == index))
        for index in {observed.completion_index(p) for p in pods}
    }
    releasable = []
    for pod in held:
        phase = (pod.get("status") or {}).get("phase")
        deleted = bool((pod.get("metadata") or {}).get("deletionTimestamp"))
        if phase in ("Succeeded", "Failed"):
            if (
                pod is not newest[observed.completion_index(pod)]
                or interrupted(pod)
                or observed.was_disrupted(pod)
            ):
                releasable.append(pod)
        elif deleted and observed.running_since(pod) is None and observed.terminated_state(pod) is None:
            releasable.append(pod)
    return releasable


def log_hint(pod: Obj | None, namespace: str) -> str:
    """Where the trainer's log is, as a command a user can paste."""
    if pod is None:
        return (
            f"the trainer pod is gone; its log may remain in your cluster's log store (namespace {namespace})"
        )
    return f"its log: kubectl logs -n {namespace} {observed.pod_name(pod)} -c trainer"

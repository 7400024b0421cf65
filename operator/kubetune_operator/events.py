"""The Event rules: which condition changes a user is told about as a Kubernetes Event, and how loudly.

Pure, like the reconcile that calls it: one Event per condition whose status or reason changed, Warning for
failures and for the waits that need attention, none for what another Event already says.
"""

from __future__ import annotations

from dataclasses import dataclass

from kubetune_operator import conditions as cond
from kubetune_operator.conditions import FALSE, TRUE, Reason
from kubetune_operator.models import Condition

WARNING_REASONS = frozenset(
    {
        Reason.INVALID_SPEC,
        Reason.CHILD_REJECTED,
        Reason.CHILD_FORBIDDEN,
        Reason.UNSCHEDULABLE,
        Reason.CONTAINER_NOT_STARTING,
        Reason.RESTARTING,
        Reason.PREEMPTED,
        Reason.INTERRUPTED,
        Reason.POD_CREATION_REFUSED,
        Reason.NO_PROGRESS,
    }
)
"""Reasons whose Event is a Warning even though the condition it reports is not Failed."""


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event to post on the FineTuneJob."""

    type: str  # Normal | Warning
    reason: str
    message: str


EVENT_CONDITIONS = (cond.VALIDATED, cond.SUSPENDED, cond.RUNNING, cond.SUCCEEDED, cond.FAILED)


def transition_events(old: tuple[Condition, ...], new: tuple[Condition, ...]) -> tuple[Event, ...]:
    """One Event per condition whose status or reason changed (the kstatus pair only mirrors these)."""
    events: list[Event] = []
    for type_ in EVENT_CONDITIONS:
        after = cond.find(new, type_)
        before = cond.find(old, type_)
        if after is None or after.reason == Reason.NOT_SUSPENDED:
            continue
        if before is not None and (before.status, before.reason) == (after.status, after.reason):
            continue
        if type_ in (cond.SUCCEEDED, cond.FAILED) and after.status != TRUE:
            continue
        if type_ == cond.RUNNING and after.status == FALSE and cond.is_true(new, cond.FAILED):
            continue  # the Failed event says it
        if type_ == cond.RUNNING and after.reason in (Reason.COMPLETED, Reason.SUSPENDED, Reason.QUEUED):
            continue  # the Succeeded / Suspended event says it
        warning = (type_ == cond.FAILED) or after.reason in WARNING_REASONS
        event = Event("Warning" if warning else "Normal", after.reason, after.message)
        if all((e.reason, e.message) != (event.reason, event.message) for e in events):
            events.append(event)
    return tuple(events)

"""The one error type the trainer raises on purpose: a contract reason, a message a user can act on, and
whether a restart of the pod could help."""

from __future__ import annotations

from kubetune_trainer import contract

# Exit codes. The Job restarts the pod on any non-zero exit (up to backoffLimit); a restart cannot fix bad
# data or refused credentials, so those exit with a distinct code the operator's pod failure policy can match.
EXIT_OK = 0
EXIT_RETRYABLE = 1
EXIT_PERMANENT = contract.EXIT_CODE_PERMANENT_FAILURE
# 128 + SIGTERM, the code a shell reports for a terminated process: "stopped, try again".
EXIT_INTERRUPTED = contract.EXIT_CODE_INTERRUPTED
# A multi-node pod whose training stopped only because another pod of its group was lost.
EXIT_PEER_LOST = contract.EXIT_CODE_PEER_LOST


class TrainerError(Exception):
    """A failure with a ``TrainerReason``; its message says what was wrong, where, and what to do."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message

    @property
    def permanent(self) -> bool:
        return self.reason in contract.PERMANENT_REASONS

    @property
    def exit_code(self) -> int:
        return EXIT_PERMANENT if self.permanent else EXIT_RETRYABLE

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"


class Interrupted(Exception):
    """SIGTERM arrived: the pod is being stopped (preemption, suspend, node drain)."""

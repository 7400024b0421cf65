"""Keep the job's Secret values out of everything the trainer writes.

The operator names, in ``KUBETUNE_SECRET_ENV``, the environment variables whose values come from Secrets (the
S3 credentials, a Hub token, any secretKeyRef in spec.trainer.env). Their values are replaced in the
trainer's stdout and stderr (so in its log, and in the log tail Kubernetes keeps as the termination message
of a container that crashed before writing its summary) and in the summary's message. The operator applies
its own pattern redaction on top; only here are the values themselves known.
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Iterable, Mapping
from typing import TextIO

from kubetune_trainer.contract import SECRET_ENV_NAMES_ENV

REDACTED = "<redacted>"
MIN_SECRET_LENGTH = 4
"""Shorter values are left alone: replacing "1" or "yes" everywhere would garble the log, not protect it."""


def secret_values(environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The values of the variables named in KUBETUNE_SECRET_ENV, longest first (so a secret that contains
    another is replaced whole)."""
    env = os.environ if environ is None else environ
    names = [n.strip() for n in env.get(SECRET_ENV_NAMES_ENV, "").split(",") if n.strip()]
    values = {env[n] for n in names if len(env.get(n, "")) >= MIN_SECRET_LENGTH}
    return tuple(sorted(values, key=len, reverse=True))


def redact(text: str, secrets: Iterable[str]) -> str:
    for value in secrets:
        if value in text:
            text = text.replace(value, REDACTED)
    return text


class _RedactingStream(io.TextIOBase):
    """A text stream that replaces the secrets in each write before passing it on."""

    def __init__(self, inner: TextIO, secrets: tuple[str, ...]) -> None:
        self._inner = inner
        self._secrets = secrets

    def write(self, text: str) -> int:
        self._inner.write(redact(text, self._secrets))
        return len(text)

    def flush(self) -> None:
        self._inner.flush()

    def fileno(self) -> int:
        return self._inner.fileno()

    def isatty(self) -> bool:
        return self._inner.isatty()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self._inner.encoding


def install_redaction() -> tuple[str, ...]:
    """Wrap sys.stdout and sys.stderr (tracebacks included) so no Secret value reaches the log; returns the
    values redacted. Safe to call twice."""
    secrets = secret_values()
    if secrets:
        for name in ("stdout", "stderr"):
            stream = getattr(sys, name)
            if not isinstance(stream, _RedactingStream):
                setattr(sys, name, _RedactingStream(stream, secrets))
    return secrets

"""The job's Secret values never reach the trainer's log or its termination message."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from kubetune_trainer.contract import SECRET_ENV_NAMES_ENV, TerminationSummary
from kubetune_trainer.recipe import write_termination_message
from kubetune_trainer.redact import REDACTED, redact, secret_values

ROOT = Path(__file__).resolve().parents[2]
SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYzEXAMPLEKEY"

CRASH = """
import os
from kubetune_trainer.redact import install_redaction
install_redaction()
print("connecting with", os.environ["AWS_SECRET_ACCESS_KEY"], flush=True)
raise RuntimeError("signature mismatch for key " + os.environ["AWS_SECRET_ACCESS_KEY"])
"""


def test_a_crash_prints_no_secret_value_to_stdout_or_the_traceback() -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(str(ROOT / p) for p in ("operator", "trainer_image")),
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE",
        "NOT_A_SECRET": SECRET[:8],
        SECRET_ENV_NAMES_ENV: "AWS_ACCESS_KEY_ID,AWS_SECRET_ACCESS_KEY",
    }
    done = subprocess.run([sys.executable, "-c", CRASH], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert SECRET not in done.stdout + done.stderr
    assert f"connecting with {REDACTED}" in done.stdout
    assert f"RuntimeError: signature mismatch for key {REDACTED}" in done.stderr


def test_the_termination_message_is_redacted(tmp_path: Path, monkeypatch) -> None:
    log = tmp_path / "termination-log"
    monkeypatch.setenv("KUBETUNE_TERMINATION_LOG", str(log))
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefghijklmnop")
    monkeypatch.setenv(SECRET_ENV_NAMES_ENV, "HF_TOKEN")
    message = "401 for token hf_abcdefghijklmnop"
    write_termination_message(TerminationSummary(outcome="Failed", reason="ModelNotFound", message=message))
    text = log.read_text()
    assert "hf_abcdefghijklmnop" not in text
    assert TerminationSummary.from_json(text).message == f"401 for token {REDACTED}"


def test_only_named_variables_of_some_length_count_and_longer_secrets_go_first() -> None:
    env = {SECRET_ENV_NAMES_ENV: "A, B,C,MISSING", "A": "abcd", "B": "abcdefgh", "C": "xy", "D": "zzzzzz"}
    assert secret_values(env) == ("abcdefgh", "abcd")
    assert redact("abcdefgh abcd zzzzzz xy", secret_values(env)) == f"{REDACTED} {REDACTED} zzzzzz xy"

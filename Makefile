# The verbs a newcomer types. Every target installs what it needs into ~/.cache/kubetune (once) first.
SHELL := /bin/bash
export PYTHONPATH := $(CURDIR)/operator:$(CURDIR)/trainer_image:$(CURDIR)
PY = "$$(bash scripts/venv.sh)/bin/python"
BUILD = bash e2e/cluster/build.sh
# What the demo needs; `make e2e` and `make binaries` build everything, Kueue's controller manager included.
DEMO_BINARIES = etcd kwok helm versitygw k8s kubectl kstatus promcrds

.PHONY: demo test e2e bench gpu-check lint venv binaries

## demo: boot a local control plane (unless kubectl reaches a cluster), install the chart, train a tiny model
demo:
	$(BUILD) $(DEMO_BINARIES)
	$(PY) -m e2e.demo

## test: unit and integration tests (operator, trainer on CPU with a real local S3 server)
test:
	$(BUILD) versitygw helm kstatus
	$(PY) -m pytest tests -q

## e2e: tests against a real API server booted from locally built binaries (Kueue's controller included)
e2e:
	$(BUILD)
	$(PY) -m pytest e2e -q

## bench: trainer throughput: its own optimizer step against the padded and the flattened transformers loops
bench:
	$(PY) -m kubetune_devtools.bench --model tiny

## gpu-check: LoRA, QLoRA and Full on this machine's GPU (bf16, 20 steps each), SIGTERM + resume, fast paths
gpu-check:
	$(PY) -m kubetune_trainer.gpu_check

## lint: ruff on everything, mypy strict on the operator
lint:
	$(PY) -m ruff check operator trainer_image tests e2e plugins
	$(PY) -m mypy

venv:
	bash scripts/venv.sh

binaries:
	$(BUILD)

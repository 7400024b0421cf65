{{/* The chart name, or nameOverride. */}}
{{- define "kubetune.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The prefix of every resource name: fullnameOverride, else "<release>-<name>" (just the release name when it
already contains the chart name). Capped at 52 characters so suffixes such as "-helm-test" stay within 63.
*/}}
{{- define "kubetune.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := include "kubetune.name" . }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "kubetune.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every resource of the release; the operator's own resources add its component label. */}}
{{- define "kubetune.labels" -}}
helm.sh/chart: {{ include "kubetune.chart" . }}
app.kubernetes.io/name: {{ include "kubetune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kubetune
{{- end }}

{{/* Labels that select the operator pods; never change them on upgrade (Deployment selectors are immutable). */}}
{{- define "kubetune.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubetune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "kubetune.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kubetune.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The operator image reference: digest wins over tag; tag defaults to the chart's appVersion. */}}
{{- define "kubetune.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The leader Lease's name (in the release namespace), used when more than one replica runs. */}}
{{- define "kubetune.leaseName" -}}
{{- include "kubetune.fullname" . }}
{{- end }}

{{/*
What the operator does in a namespace it watches, and nothing more (tests/chart/test_chart_rbac.py checks
these rules against the operator's own API calls and the handlers it registers with kopf). Secrets are
absent on purpose: the trainer pod references the S3 credentials Secret by name and the kubelet resolves it;
the operator never reads it. The operator deletes nothing but a trainer pod its progress watchdog gives up
on: owner references let the garbage collector remove a FineTuneJob's ConfigMap and Job with it.
*/}}
{{- define "kubetune.namespacedRules" -}}
# kopf watches FineTuneJobs and keeps its bookkeeping in annotations; the operator re-reads one before acting.
- apiGroups: [kubetune.io]
  resources: [finetunejobs]
  verbs: [get, list, watch, patch]
# The children's ownerReferences set blockOwnerDeletion (the garbage collector removes them before their
# FineTuneJob under foreground deletion); where the OwnerReferencesPermissionEnforcement admission plugin is
# on, that needs update on the owner's finalizers, or every child create is forbidden (ChildForbidden).
- apiGroups: [kubetune.io]
  resources: [finetunejobs/finalizers]
  verbs: [update]
# Conditions, phase, progress, metrics and the adapter record.
- apiGroups: [kubetune.io]
  resources: [finetunejobs/status]
  verbs: [patch]
# The trainer Job: created once, watched, and patched to (un)suspend it, to follow lifecycle edits and to
# remove the operator's own kubetune.io/result finalizer.
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, list, watch, create, patch]
# The trainer config, rewritten only while no trainer Job exists yet.
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, create, patch]
# A multi-node job's headless Service (spec.resources.nodes > 1), which names its trainer pods; read to check
# it is there and ours, never changed once created.
- apiGroups: [""]
  resources: [services]
  verbs: [get, create]
# Trainer pods: their IP (for the metrics scrape), their state and termination message (the result), patch
# only to remove the operator's own kubetune.io/result finalizer once the result is recorded, and delete only
# a trainer pod that stopped making steps (spec.progressDeadlineSeconds), so its Job starts a new attempt.
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch, patch, delete]
# Events on FineTuneJobs: phase transitions, and kopf's own warnings. Listed (by field selector) only for a
# trainer Job that has no pod: its FailedCreate Events say why (a quota, Pod Security).
- apiGroups: [""]
  resources: [events]
  verbs: [create, list]
# Kueue's Workload for a queued trainer Job (spec.queueName), read-only: its QuotaReserved/Admitted message
# goes into the FineTuneJob's Queued condition. Harmless where Kueue is not installed (the operator reads a
# 404 as "no Kueue" and says so in the condition).
- apiGroups: [kueue.x-k8s.io]
  resources: [workloads]
  verbs: [list]
{{- end }}

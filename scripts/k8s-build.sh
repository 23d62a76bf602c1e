#!/usr/bin/env bash
# Builds a real Kubernetes control plane for the integration tests
# (tests/k8s/mod.rs): etcd, kube-apiserver and kube-controller-manager first,
# then kube-scheduler, kubelet, kube-proxy and kubectl, all from the Go module
# proxy, once, into
#   ${XDG_CACHE_HOME:-$HOME/.cache}/lameduck-tools/k8s-<version>/
# A later run finds the stamp and returns at once. Concurrent runs (parallel
# test binaries) serialise on a flock; the second finds the work done.
#
# The recipe: a throwaway Go module requiring k8s.io/kubernetes, with a
# `replace k8s.io/<staging> => k8s.io/<staging> v0.<minor>.<patch>` for every
# staging module of kubernetes' own go.mod (its `=> ./staging/...` replaces
# do not apply to a dependent module). etcd comes from go.etcd.io/etcd/server/v3
# at the version kubernetes itself requires, built in the same module so the
# two share one dependency graph and one build cache.
#
#   scripts/k8s-build.sh                 # build (or confirm) the pinned set
#   K8S_BUILD_ONLY=core scripts/k8s-build.sh   # only etcd, apiserver, controller-manager
# Prints the directory holding the binaries on its last line.
set -euo pipefail

K8S_VERSION="v1.37.2"
# Kubernetes v1.37.2's go.mod requires go.etcd.io/etcd/server/v3 v3.7.0.
ETCD_VERSION="v3.7.0"
CORE=(kube-apiserver kube-controller-manager)
EXTRA=(kube-scheduler kubelet kube-proxy kubectl)

TOOLS="${XDG_CACHE_HOME:-$HOME/.cache}/lameduck-tools"
DEST="$TOOLS/k8s-$K8S_VERSION"
STAMP_CORE="$DEST/.stamp-core-etcd-$ETCD_VERSION"
STAMP_ALL="$DEST/.stamp-all-etcd-$ETCD_VERSION"
want="${K8S_BUILD_ONLY:-all}"

die() { printf 'k8s-build.sh: FAIL: %s\n' "$*" >&2; exit 1; }
done_already() {
  if [[ "$want" == core ]]; then [[ -f "$STAMP_CORE" ]]; else [[ -f "$STAMP_ALL" ]]; fi
}

# Fast path, without the lock: nothing to do.
if done_already; then echo "$DEST"; exit 0; fi

command -v go >/dev/null 2>&1 || die "go is not installed (needed to build Kubernetes)"
command -v flock >/dev/null 2>&1 || die "flock (util-linux) is not installed"
mkdir -p "$DEST"
exec 9>"$TOOLS/k8s-$K8S_VERSION.lock"
if ! flock -n 9; then
  echo "k8s-build.sh: another build of Kubernetes $K8S_VERSION is running; waiting for it" >&2
  flock 9
fi
if done_already; then echo "$DEST"; exit 0; fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
t0=$SECONDS
export GOFLAGS="-mod=mod -buildvcs=false"
# Kubernetes v1.37 needs go >= 1.26.0; a newer GOTOOLCHAIN is fetched from the
# proxy only if the local go is too old (GOTOOLCHAIN=auto semantics).
[[ -n "${GOTOOLCHAIN:-}" ]] || export GOTOOLCHAIN=auto

echo "k8s-build.sh: building Kubernetes $K8S_VERSION + etcd $ETCD_VERSION into $DEST (once; ~8 min on 2 cores)" >&2
cd "$WORK"
go mod init lameduck.local/k8s-tools >/dev/null 2>&1
gomod="$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')"
[[ -n "$gomod" && -f "$gomod" ]] || die "could not fetch k8s.io/kubernetes@$K8S_VERSION"
staging_version="v0.${K8S_VERSION#v1.}"   # v1.37.2 -> v0.37.2
mapfile -t staging < <(awk '/^replace \(/ { r = 1; next } r && /^\)/ { r = 0 } r && $2 == "=>" && $3 ~ /^\.\/staging\// { print $1 }' "$gomod")
[[ "${#staging[@]}" -gt 10 ]] || die "found only ${#staging[@]} staging replaces in $gomod"
kube_etcd="$(awk '$1 == "go.etcd.io/etcd/server/v3" { print $2; exit }' "$gomod")"
[[ "$kube_etcd" == "$ETCD_VERSION" ]] || echo "k8s-build.sh: note: kubernetes $K8S_VERSION requires etcd server $kube_etcd, building $ETCD_VERSION" >&2
{
  echo "require ("
  echo "  k8s.io/kubernetes $K8S_VERSION"
  echo "  go.etcd.io/etcd/server/v3 $ETCD_VERSION"
  echo ")"
  echo "replace ("
  for m in "${staging[@]}"; do echo "  $m => $m $staging_version"; done
  echo ")"
} >>go.mod
# A file importing the main packages keeps them (and their deps) in the graph.
{
  echo "//go:build tools"
  echo "package tools"
  echo "import ("
  for c in "${CORE[@]}" "${EXTRA[@]}"; do echo "  _ \"k8s.io/kubernetes/cmd/$c\""; done
  echo "  _ \"go.etcd.io/etcd/server/v3\""
  echo ")"
} >tools.go
nice go mod tidy -e >"$WORK/tidy.log" 2>&1 || { cat "$WORK/tidy.log" >&2; die "go mod tidy"; }
echo "k8s-build.sh: module graph resolved after $((SECONDS - t0))s" >&2

minor="${K8S_VERSION#v1.}"; minor="${minor%%.*}"
vpkg="k8s.io/component-base/version"
date_utc="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
ld_k8s="-s -w -X $vpkg.gitVersion=$K8S_VERSION -X $vpkg.gitMajor=1 -X $vpkg.gitMinor=$minor"
ld_k8s="$ld_k8s -X $vpkg.gitCommit=0000000000000000000000000000000000000000 -X $vpkg.gitTreeState=clean -X $vpkg.buildDate=$date_utc"
ld_etcd="-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=module-$ETCD_VERSION"

# build NAME PKG LDFLAGS [MARKER]: go build into a temp name in $DEST, then
# rename; a marker per binary lets an interrupted run resume where it stopped.
build() {
  local name="$1" pkg="$2" ld="$3" ok="$DEST/.ok-${4:-$1}" t=$SECONDS
  [[ -x "$DEST/$name" && -f "$ok" ]] && return 0
  nice go build -trimpath -ldflags "$ld" -o "$DEST/.$name.tmp" "$pkg" || die "building $pkg"
  mv -f "$DEST/.$name.tmp" "$DEST/$name"
  : >"$ok"
  echo "k8s-build.sh: $name built in $((SECONDS - t))s (total $((SECONDS - t0))s)" >&2
}

build kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver "$ld_k8s"
build etcd go.etcd.io/etcd/server/v3 "$ld_etcd" "etcd-$ETCD_VERSION"
build kube-controller-manager k8s.io/kubernetes/cmd/kube-controller-manager "$ld_k8s"
# (Captured first: `| grep -q` could SIGPIPE the binary and trip pipefail.)
v="$("$DEST/kube-apiserver" --version)"
[[ "$v" == "Kubernetes $K8S_VERSION" ]] || die "kube-apiserver --version is '$v', not $K8S_VERSION"
v="$("$DEST/etcd" --version)"
[[ "$v" == *"etcd Version: ${ETCD_VERSION#v}"* ]] || die "etcd --version is '$v', not $ETCD_VERSION"
: >"$STAMP_CORE"
if [[ "$want" != core ]]; then
  for c in "${EXTRA[@]}"; do build "$c" "k8s.io/kubernetes/cmd/$c" "$ld_k8s"; done
  : >"$STAMP_ALL"
fi
echo "k8s-build.sh: done in $((SECONDS - t0))s" >&2
echo "$DEST"

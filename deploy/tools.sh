#!/usr/bin/env bash
# The tools deploy/validate.sh and tests/k8s_manifests.rs need, built once
# from the Go module proxy into
#   ${XDG_CACHE_HOME:-$HOME/.cache}/lameduck-tools
# and reused afterwards. Prints the tool's absolute path (the only line on
# stdout); progress goes to stderr.
#
#   deploy/tools.sh helm        # helm $HELM_VERSION (default v3.22.0)
#
# HELM=/path/to/helm is honoured (and only checked). Concurrent callers (the
# test binaries, validate.sh) serialise on a flock; the second finds the work
# done. Needs Go (>= 1.26).
set -euo pipefail

TOOLS="${XDG_CACHE_HOME:-$HOME/.cache}/lameduck-tools"
HELM_VERSION="${HELM_VERSION:-v3.22.0}"

die() { printf 'deploy/tools.sh: FAIL: %s\n' "$*" >&2; exit 1; }

build_helm() {
  local dest="$TOOLS/helm-$HELM_VERSION"
  if [[ -x "$dest" ]]; then echo "$dest"; return; fi
  command -v go >/dev/null 2>&1 || die "go is not installed (needed to build helm)"
  command -v flock >/dev/null 2>&1 || die "flock (util-linux) is not installed"
  mkdir -p "$TOOLS"
  exec 9>"$TOOLS/helm-$HELM_VERSION.lock"
  if ! flock -n 9; then
    echo "deploy/tools.sh: waiting for another build of helm $HELM_VERSION" >&2
    flock 9
  fi
  if [[ -x "$dest" ]]; then echo "$dest"; return; fi
  local work
  work="$(mktemp -d)"
  # shellcheck disable=SC2064 # expand now: $work is local
  trap "rm -rf '$work'" EXIT
  echo "deploy/tools.sh: building helm $HELM_VERSION into $TOOLS (once; a few minutes on 2 cores)" >&2
  # The -X flags are those of helm's own Makefile: without them a
  # `go install`ed helm assumes Kubernetes v1.20 when no cluster is given,
  # while release binaries assume their client-go version.
  local gomod kver kminor ld pkg
  gomod="$(cd "$work" && GOFLAGS=-mod=mod go mod download -json "helm.sh/helm/v3@$HELM_VERSION" \
    | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')"
  [[ -n "$gomod" && -f "$gomod" ]] || die "could not fetch helm.sh/helm/v3@$HELM_VERSION"
  kver="$(awk '$1 == "k8s.io/client-go" { print $2; exit }' "$gomod")"   # e.g. v0.37.0
  kminor="$(echo "$kver" | cut -d. -f2)"
  ld="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
  for pkg in helm.sh/helm/v3/pkg/chartutil helm.sh/helm/v3/pkg/lint/rules; do
    ld="$ld -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$kminor"
  done
  (cd "$work" && GOBIN="$work/bin" nice go install -trimpath -ldflags "$ld" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION") >&2 \
    || die "building helm failed"
  mv "$work/bin/helm" "$dest.tmp"
  mv "$dest.tmp" "$dest"
  echo "$dest"
}

case "${1:-}" in
  helm)
    if [[ -n "${HELM:-}" ]]; then
      "$HELM" version --short >/dev/null || die "HELM=$HELM does not run"
      echo "$HELM"
    else
      helm="$(build_helm)"
      "$helm" version --short >/dev/null || die "$helm does not run"
      echo "$helm"
    fi
    ;;
  *)
    echo "usage: deploy/tools.sh helm" >&2
    exit 2
    ;;
esac

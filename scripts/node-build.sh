#!/usr/bin/env bash
# Builds the node half of the lab cluster (tests/lab/): containerd with ctr and
# containerd-shim-runc-v2, runc and crictl from the Go module proxy, and a
# pause image and the lab's hostile-pod image (tests/lab/flood.c) built
# from scratch, once, into
#   ${XDG_CACHE_HOME:-$HOME/.cache}/lameduck-tools/node-<key>/
# (key = the pinned versions). The CNI plugins and iptables come from Debian
# (installed when missing). A later run finds the stamp and returns at once;
# concurrent runs serialise on a flock.
#
# Why from source: Debian's containerd (1.6) is too old for a v1.37 kubelet
# (it needs CRI v1 with the RuntimeConfig call), and no registry is reachable
# here, so the pause image is a static binary of our own.
#
#   scripts/node-build.sh     # prints the directory on its last line
set -euo pipefail

CONTAINERD_VERSION="v2.4.2"
RUNC_VERSION="v1.5.3"
CRICTL_VERSION="v1.37.0"
PAUSE_VERSION="3.10-lameduck" # the tag of our own pause image
KEY="containerd-$CONTAINERD_VERSION-runc-$RUNC_VERSION-crictl-$CRICTL_VERSION-pause-$PAUSE_VERSION"

SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
TOOLS="${XDG_CACHE_HOME:-$HOME/.cache}/lameduck-tools"
DEST="$TOOLS/node-$KEY"
STAMP="$DEST/.stamp"
FLOOD_SRC="$(cd "$(dirname "$0")/.." && pwd)/tests/lab/flood.c"
FLOOD_KEY="$(sha256sum "$FLOOD_SRC" | cut -c1-12)"

die() { printf 'node-build.sh: FAIL: %s\n' "$*" >&2; exit 1; }
log() { printf 'node-build.sh: %s\n' "$*" >&2; }

sudo=""
[[ "$(id -u)" -eq 0 ]] || sudo="sudo"
# Debian packages the lab needs at run time too (CNI plugins, iptables for
# kube-proxy, libseccomp for runc's cgo build, gcc/libc6-dev for the pause
# binary, umoci for its image): checked on every run, installed when missing.
missing=()
[[ -x /usr/lib/cni/bridge && -x /usr/lib/cni/host-local && -x /usr/lib/cni/loopback ]] \
  || missing+=(containernetworking-plugins)
command -v iptables >/dev/null 2>&1 || [[ -x /usr/sbin/iptables ]] || missing+=(iptables)
command -v conntrack >/dev/null 2>&1 || [[ -x /usr/sbin/conntrack ]] || missing+=(conntrack)
pkg-config --exists libseccomp 2>/dev/null || missing+=(libseccomp-dev pkg-config)
command -v gcc >/dev/null 2>&1 || missing+=(gcc libc6-dev)
command -v umoci >/dev/null 2>&1 || missing+=(umoci)
command -v flock >/dev/null 2>&1 || missing+=(util-linux)
command -v nsenter >/dev/null 2>&1 || missing+=(util-linux)
if [[ "${#missing[@]}" -gt 0 ]]; then
  log "installing ${missing[*]}"
  apt=(-o DPkg::Lock::Timeout=600)
  apt-cache show "${missing[@]}" >/dev/null 2>&1 || $sudo apt-get "${apt[@]}" update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get "${apt[@]}" install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null || die "apt-get install ${missing[*]} failed"
fi

if [[ -f "$STAMP" && -f "$DEST/.ok-flood-$FLOOD_KEY" ]]; then echo "$DEST"; exit 0; fi

command -v go >/dev/null 2>&1 || die "go is not installed (needed to build containerd, runc, crictl)"
mkdir -p "$DEST"
exec 9>"$TOOLS/node-$KEY.lock"
if ! flock -n 9; then
  log "another node build is running; waiting for it"
  flock 9
fi
if [[ -f "$STAMP" && -f "$DEST/.ok-flood-$FLOOD_KEY" ]]; then echo "$DEST"; exit 0; fi

WORK="$(mktemp -d)"
trap 'chmod -R u+w "$WORK" 2>/dev/null; rm -rf "$WORK"' EXIT
t0=$SECONDS
export GOFLAGS="-mod=mod -buildvcs=false"
[[ -n "${GOTOOLCHAIN:-}" ]] || export GOTOOLCHAIN=auto

# source MODULE VERSION: a writable copy of the module's source from the
# proxy, built inside its own go.mod so its replace directives apply (they
# would not for `go install m@v` or for a dependent module).
source_of() {
  local dir
  dir="$(go mod download -json "$1@$2" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
  [[ -n "$dir" && -d "$dir" ]] || die "could not fetch $1@$2 from the Go module proxy"
  local copy="$WORK/$(basename "$1")-$2"
  cp -r "$dir" "$copy"
  chmod -R u+w "$copy"
  echo "$copy"
}

# build NAME DIR PKG TAGS LDFLAGS [CGO]: into a temp name in $DEST, then
# rename; a marker per binary lets an interrupted run resume where it stopped.
build() {
  local name="$1" dir="$2" pkg="$3" tags="$4" ld="$5" cgo="${6:-0}" ok="$DEST/.ok-$1" t=$SECONDS
  [[ -x "$DEST/$name" && -f "$ok" ]] && return 0
  (cd "$dir" && CGO_ENABLED="$cgo" nice go build -trimpath -tags "$tags" -ldflags "$ld" \
    -o "$DEST/.$name.tmp" "$pkg") || die "building $name ($pkg)"
  mv -f "$DEST/.$name.tmp" "$DEST/$name"
  : >"$ok"
  log "$name built in $((SECONDS - t))s (total $((SECONDS - t0))s)"
}

log "building containerd $CONTAINERD_VERSION, runc $RUNC_VERSION, crictl $CRICTL_VERSION into $DEST (once)"

src="$(source_of github.com/containerd/containerd/v2 "$CONTAINERD_VERSION")"
cpkg=github.com/containerd/containerd/v2
ld_ctd="-s -w -X $cpkg/version.Version=$CONTAINERD_VERSION -X $cpkg/version.Revision=module -X $cpkg/version.Package=github.com/containerd/containerd/v2"
# no_btrfs, no_devmapper: snapshotters that need C headers we do not have and
# a node that uses overlayfs anyway.
build containerd "$src" ./cmd/containerd "no_btrfs no_devmapper" "$ld_ctd"
build ctr "$src" ./cmd/ctr "no_btrfs no_devmapper" "$ld_ctd"
build containerd-shim-runc-v2 "$src" ./cmd/containerd-shim-runc-v2 "no_btrfs no_devmapper" "$ld_ctd"

src="$(source_of github.com/opencontainers/runc "$RUNC_VERSION")"
# seccomp (cgo, libseccomp): the kubelet's default RuntimeDefault profile.
build runc "$src" . "seccomp urfave_cli_no_docs" \
  "-X main.version=${RUNC_VERSION#v} -X main.gitCommit=module" 1

src="$(source_of sigs.k8s.io/cri-tools "$CRICTL_VERSION")"
build crictl "$src" ./cmd/crictl "" "-s -w -X sigs.k8s.io/cri-tools/pkg/version.Version=$CRICTL_VERSION"

v="$("$DEST/containerd" --version)"
[[ "$v" == *"$CONTAINERD_VERSION"* ]] || die "containerd --version is '$v', not $CONTAINERD_VERSION"
v="$("$DEST/runc" --version)"
[[ "$v" == *"${RUNC_VERSION#v}"* ]] || die "runc --version is '$v', not $RUNC_VERSION"
[[ "$v" == *"libseccomp"* ]] || die "runc was built without seccomp: '$v'"
v="$("$DEST/crictl" --version)"
[[ "$v" == *"$CRICTL_VERSION"* ]] || die "crictl --version is '$v', not $CRICTL_VERSION"

# c_image NAME REF USER SRC: the static binary gcc builds from the one C file
# SRC, alone in an OCI image archive $DEST/NAME.tar that containerd imports as
# REF (that name also in $DEST/NAME.name), entrypoint /NAME, run as USER.
c_image() {
  local name="$1" ref="$2" user="$3" src="$4" tag="${2##*:}"
  local L="$WORK/oci-$1" bundle="$WORK/bundle-$1"
  gcc -static -Os -s -Wall -o "$WORK/$name" "$src" || die "gcc -static $src"
  umoci init --layout "$L"
  umoci new --image "$L:$tag"
  umoci unpack --image "$L:$tag" "$bundle" >/dev/null
  install -m 0755 "$WORK/$name" "$bundle/rootfs/$name"
  umoci repack --image "$L:$tag" --history.created_by "scripts/node-build.sh: /$name (gcc -static)" "$bundle"
  umoci config --image "$L:$tag" --config.entrypoint "/$name" --config.user "$user"
  umoci gc --layout "$L"
  python3 "$(dirname "$SELF")/oci-image-name.py" "$L/index.json" "$ref"
  (cd "$L" && tar -cf "$DEST/$name.tar" oci-layout index.json blobs) || die "tar $name image"
  echo "$ref" >"$DEST/$name.name"
}

# The pause image: a static binary that waits for a signal and reaps the
# zombies of the pod's shared PID namespace (what Kubernetes' pause.c does).
if [[ ! -f "$DEST/.ok-pause" ]]; then
  cat >"$WORK/pause.c" <<'EOF'
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>
static void stop(int sig) { (void)sig; _exit(0); }
static void reap(int sig) { (void)sig; while (waitpid(-1, NULL, WNOHANG) > 0) {} }
int main(void) {
  struct sigaction term = {.sa_handler = stop}, chld = {.sa_handler = reap, .sa_flags = SA_NOCLDSTOP};
  sigaction(SIGINT, &term, NULL);
  sigaction(SIGTERM, &term, NULL);
  sigaction(SIGCHLD, &chld, NULL);
  for (;;) pause();
}
EOF
  c_image pause "registry.k8s.io/pause:$PAUSE_VERSION" 65535:65535 "$WORK/pause.c"
  : >"$DEST/.ok-pause"
fi

# The lab's hostile pod (tests/lab/flood.c), rebuilt when its source changes.
if [[ ! -f "$DEST/.ok-flood-$FLOOD_KEY" ]]; then
  c_image flood "lameduck.test/flood:$FLOOD_KEY" 65534:65534 "$FLOOD_SRC"
  : >"$DEST/.ok-flood-$FLOOD_KEY"
fi

sha256sum "$SELF" | cut -d' ' -f1 >"$DEST/.script"
: >"$STAMP"
log "done in $((SECONDS - t0))s"
echo "$DEST"

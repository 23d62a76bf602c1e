#!/usr/bin/env bash
# Builds the lameduck container image here, without a container engine:
#
#   1. a static binary: `cargo build --release` for x86_64-unknown-linux-gnu
#      with `-C target-feature=+crt-static` (static glibc), in a target dir of
#      its own so it never fights with the normal target/;
#   2. an OCI image from scratch holding only /lameduck (0755), made with
#      umoci (Debian's package): user 65532:65532, ENTRYPOINT ["/lameduck"],
#      ports 8000/tcp and 9901/tcp, the org.opencontainers.image.* labels;
#   3. the same image as an oci-archive tarball, for
#      `ctr -n k8s.io images import lameduck-<version>.tar` (the index carries
#      io.containerd.image.name, so the import names it lameduck:<version>).
#
# Everything lands in ${XDG_CACHE_HOME:-$HOME/.cache}/lameduck-tools/image/:
#   target/              the static build
#   oci/                 the OCI image layout (tag <version>)
#   lameduck-<version>.tar
#
# Cached: the binary is rebuilt only when the content of src/, Cargo.toml or
# Cargo.lock (or the toolchain) changed, and the image only when the binary,
# the version, the revision or this script changed. Concurrent runs serialise on
# a flock. Installs umoci (and file) with apt-get when missing.
#
# The Dockerfile builds the same entrypoint/user/ports on a distroless
# runtime with a dynamically linked binary; tests/image.rs checks that the
# two agree where they can be compared. Name resolution differs a little:
# static glibc has the `files` and `dns` NSS back-ends built in (no
# /etc/nsswitch.conf in the image means "files, then dns"), and cannot load
# any other one. In a pod the kubelet mounts /etc/hosts and /etc/resolv.conf,
# so `--upstream localhost:PORT` and Service names resolve; outside Kubernetes
# (e.g. plain `ctr run`) there is no /etc/hosts, so use 127.0.0.1.
#
# Prints the image's size, and on its last two lines `layout=DIR` and
# `archive=FILE`.
set -euo pipefail
SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$SELF")/.."

TARGET="x86_64-unknown-linux-gnu"
TOOLS="${XDG_CACHE_HOME:-$HOME/.cache}/lameduck-tools"
OUT="$TOOLS/image"
BIN="$OUT/target/$TARGET/release/lameduck"
LAYOUT="$OUT/oci"
STAMP="$OUT/.stamp"
SUMMARY="$OUT/summary.txt"

die() { printf 'image.sh: FAIL: %s\n' "$*" >&2; exit 1; }
log() { printf 'image.sh: %s\n' "$*" >&2; }

# The [package] version of Cargo.toml (the first `version =` in that table).
VERSION="$(awk -F'"' '/^\[/{p=($0=="[package]")} p&&/^version *=/{print $2; exit}' Cargo.toml)"
[[ -n "$VERSION" ]] || die "no [package] version in Cargo.toml"
ARCHIVE="$OUT/lameduck-$VERSION.tar"

# revision: the commit; "-dirty" when what the binary is built from differs
# from it. created: the commit time, so the same commit and binary give the
# same image digest.
if REVISION="$(git rev-parse HEAD 2>/dev/null)"; then
  if [[ -n "$(git status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null)" ]]; then
    REVISION="$REVISION-dirty"
  fi
  EPOCH="$(git log -1 --format=%ct)"
else
  REVISION="unknown"
  EPOCH=0
fi
CREATED="$(date -u -d "@$EPOCH" +%Y-%m-%dT%H:%M:%SZ)"

sudo=""
[[ "$(id -u)" -eq 0 ]] || sudo="sudo"
install_pkgs() {
  log "installing $*"
  apt-cache show "$@" >/dev/null 2>&1 || $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null \
    || die "apt-get install $* failed"
}
missing=()
command -v umoci >/dev/null 2>&1 || missing+=(umoci)
command -v file >/dev/null 2>&1 || missing+=(file)
command -v flock >/dev/null 2>&1 || missing+=(util-linux)
[[ "${#missing[@]}" -eq 0 ]] || install_pkgs "${missing[@]}"
command -v umoci >/dev/null 2>&1 || die "umoci is not installed and apt-get could not install it"

mkdir -p "$OUT"
exec 9>"$TOOLS/image.lock"
if ! flock -n 9; then
  log "another image build is running; waiting for it"
  flock 9
fi
rm -rf "$OUT"/.work.*

# ---------------------------------------------------------------------------
# 1. The static binary.
# The cache key is the content of what the binary is built from (src/,
# Cargo.toml, Cargo.lock) and the toolchain, not mtimes: CI's fresh clone and
# a developer's tree share this cache on one machine, and a binary built from
# one checkout is newer than the other's unsaved edits.
SOURCE_KEY="$({
  find src Cargo.toml Cargo.lock -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
  rustc -vV
  echo "RUSTFLAGS=-C target-feature=+crt-static --target $TARGET"
} | sha256sum | cut -d' ' -f1)"
BIN_KEY="$OUT/.binary-source"
if [[ -x "$BIN" && -f "$BIN_KEY" && "$(cat "$BIN_KEY")" == "$SOURCE_KEY" ]]; then
  :
else
  rm -f "$BIN_KEY"
  log "building the static binary (cargo build --release, +crt-static, $TARGET)"
  t0=$SECONDS
  # cargo's own freshness check reads mtimes too, and the lameduck artifacts
  # here may come from another checkout: drop them (dependencies stay).
  if [[ -d "$OUT/target" ]]; then
    cargo clean --quiet --release -p lameduck --target "$TARGET" --target-dir "$OUT/target" >&2
  fi
  # --target keeps RUSTFLAGS away from build scripts and proc-macros (they
  # are built for the host and must stay dynamic).
  RUSTFLAGS="-C target-feature=+crt-static" nice -n 10 \
    cargo build --release --locked --bin lameduck --target "$TARGET" --target-dir "$OUT/target" >&2
  echo "$SOURCE_KEY" >"$BIN_KEY"
  log "static binary built in $((SECONDS - t0)) s"
fi

BIN_SHA="$(sha256sum "$BIN" | cut -d' ' -f1)"
SCRIPT_SHA="$(sha256sum "$SELF" | cut -d' ' -f1)"
WANT="version=$VERSION revision=$REVISION created=$CREATED binary=$BIN_SHA script=$SCRIPT_SHA"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" && -f "$LAYOUT/index.json" && -f "$ARCHIVE" ]]; then
  cat "$SUMMARY" >&2
  echo "layout=$LAYOUT"
  echo "archive=$ARCHIVE"
  exit 0
fi
rm -f "$STAMP"

WORK="$(mktemp -d "$OUT/.work.XXXXXX")"
demo_pid=""
proxy_pid=""
cleanup() {
  [[ -z "$proxy_pid" ]] || kill "$proxy_pid" 2>/dev/null || true
  [[ -z "$demo_pid" ]] || kill "$demo_pid" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# ---------------------------------------------------------------------------
# 2. Is it static, and does it run?
file_out="$(file -b "$BIN")"
ldd_out="$(ldd "$BIN" 2>&1 || true)"
log "file: $file_out"
log "ldd: $(echo "$ldd_out" | tr -s ' \t\n' ' ')"
[[ "$file_out" == *"statically linked"* || "$file_out" == *"static-pie linked"* ]] \
  || die "$BIN is not statically linked: $file_out"
[[ "$ldd_out" == *"not a dynamic executable"* || "$ldd_out" == *"statically linked"* ]] \
  || die "ldd finds shared libraries in $BIN: $ldd_out"
version_out="$("$BIN" --version)"
[[ "$version_out" == "lameduck $VERSION" ]] || die "--version printed '$version_out', not 'lameduck $VERSION'"

# One GET over HTTP/1.1 with bash's /dev/tcp; prints the status line.
http_get() {
  local port="$1" path="$2" line
  exec 8<>"/dev/tcp/127.0.0.1/$port" || return 1
  printf 'GET %s HTTP/1.1\r\nHost: image-check\r\nConnection: close\r\n\r\n' "$path" >&8
  IFS= read -r -t 5 line <&8 || line=""
  exec 8<&-
  printf '%s\n' "${line%$'\r'}"
}
# Polls a log file for a pattern (up to 10 s); prints the first match.
wait_for() {
  local file="$1" pattern="$2" i m
  for ((i = 0; i < 100; i++)); do
    m="$(grep -oE -m1 "$pattern" "$file" 2>/dev/null || true)"
    if [[ -n "$m" ]]; then printf '%s\n' "$m"; return 0; fi
    sleep 0.1
  done
  return 1
}
# The demo (app + proxy on loopback, ports chosen by the kernel) must answer,
# and a second proxy given the app as `localhost:PORT` must reach it: static
# glibc resolves the name through /etc/hosts.
"$BIN" demo --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --upstream 127.0.0.1:0 \
  --drain-delay 0s --metrics-linger 0s >"$WORK/demo.log" 2>&1 &
demo_pid=$!
banner="$(wait_for "$WORK/demo.log" 'app on 127\.0\.0\.1:[0-9]+, proxy on 127\.0\.0\.1:[0-9]+')" \
  || die "lameduck demo did not start: $(head -c 2000 "$WORK/demo.log")"
app_port="$(sed -E 's/app on 127\.0\.0\.1:([0-9]+),.*/\1/' <<<"$banner")"
demo_port="$(sed -E 's/.*proxy on 127\.0\.0\.1:([0-9]+)/\1/' <<<"$banner")"
status="$(http_get "$demo_port" /)" || status=""
[[ "$status" == "HTTP/1.1 200"* ]] || die "lameduck demo answered '$status' on 127.0.0.1:$demo_port"
log "demo: GET / through the proxy: $status"

"$BIN" --upstream "localhost:$app_port" --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 \
  --drain-delay 0s --metrics-linger 0s >"$WORK/proxy.log" 2>&1 &
proxy_pid=$!
proxy_port="$(wait_for "$WORK/proxy.log" '"proxy":"127\.0\.0\.1:[0-9]+"' | grep -oE '[0-9]+"$' | tr -d '"')" \
  || die "lameduck --upstream localhost:$app_port did not start: $(head -c 2000 "$WORK/proxy.log")"
status="$(http_get "$proxy_port" /)" || status=""
[[ "$status" == "HTTP/1.1 200"* ]] \
  || die "through --upstream localhost:$app_port: '$status' ($(head -c 2000 "$WORK/proxy.log"))"
log "--upstream localhost:$app_port resolved: $status"
kill -TERM "$proxy_pid" "$demo_pid"
wait "$proxy_pid" "$demo_pid" || true
proxy_pid=""
demo_pid=""

# ---------------------------------------------------------------------------
# 3. The image. umoci's own `insert` is not used: 0.4.7 (Debian 12) does not
# close the layer's tar stream, and GNU tar rejects such a layer
# (opencontainers/umoci#436, fixed after 0.4.7); unpack + repack writes a
# complete one.
L="$WORK/oci"
umoci init --layout "$L"
umoci new --image "$L:$VERSION"
rootless=()
[[ "$(id -u)" -eq 0 ]] || rootless=(--rootless)
umoci unpack "${rootless[@]}" --image "$L:$VERSION" "$WORK/bundle"
rootfs="$WORK/bundle/rootfs"
touch -r "$rootfs" "$WORK/rootfs-time"
install -m 0755 "$BIN" "$rootfs/lameduck"
touch -d "@$EPOCH" "$rootfs/lameduck"
# The root directory keeps its recorded mtime, so the layer holds exactly one
# entry, `lameduck`, and no `./`.
touch -r "$WORK/rootfs-time" "$rootfs"
umoci repack --image "$L:$VERSION" \
  --history.created "$CREATED" \
  --history.created_by "scripts/image.sh: /lameduck (cargo build --release, static glibc, $TARGET)" \
  "$WORK/bundle"

description="$(awk -F'"' '/^\[/{p=($0=="[package]")} p&&/^description *=/{print $2; exit}' Cargo.toml)"
license="$(awk -F'"' '/^\[/{p=($0=="[package]")} p&&/^license *=/{print $2; exit}' Cargo.toml)"
# No public URL is recorded in the repository: LAMEDUCK_IMAGE_SOURCE, else
# Cargo.toml's package.repository, else the git remote `origin`.
source_url="${LAMEDUCK_IMAGE_SOURCE:-$(awk -F'"' '/^\[/{p=($0=="[package]")} p&&/^repository *=/{print $2; exit}' Cargo.toml)}"
[[ -n "$source_url" ]] || source_url="$(git remote get-url origin 2>/dev/null || true)"
[[ -n "$source_url" ]] || source_url="unknown"
labels=(
  "org.opencontainers.image.title=lameduck"
  "org.opencontainers.image.description=$description"
  "org.opencontainers.image.source=$source_url"
  "org.opencontainers.image.version=$VERSION"
  "org.opencontainers.image.licenses=$license"
  "org.opencontainers.image.revision=$REVISION"
)
label_args=()
for l in "${labels[@]}"; do label_args+=(--config.label "$l"); done
# Same runtime settings as the Dockerfile's final stage: USER 65532:65532,
# EXPOSE 8000 9901, ENTRYPOINT ["/lameduck"].
umoci config --image "$L:$VERSION" \
  --created "$CREATED" \
  --config.entrypoint /lameduck \
  --config.user 65532:65532 \
  --config.exposedports 8000/tcp --config.exposedports 9901/tcp \
  "${label_args[@]}" \
  --history.created "$CREATED" \
  --history.created_by 'ENTRYPOINT ["/lameduck"] USER 65532:65532 EXPOSE 8000/tcp 9901/tcp'
umoci gc --layout "$L"

# containerd names an imported image after io.containerd.image.name; the OCI
# ref.name stays the bare tag.
python3 "$(dirname "$SELF")/oci-image-name.py" "$L/index.json" "docker.io/library/lameduck:$VERSION"
chmod -R a+rX "$L"

# Sizes: the compressed layer (what a pull transfers), the uncompressed layer
# tar, and the unpacked root filesystem.
read -r layer_digest layer_bytes < <(python3 - "$L" <<'EOF'
import json, sys
root = sys.argv[1]
index = json.load(open(f"{root}/index.json"))
digest = index["manifests"][0]["digest"].split(":", 1)[1]
manifest = json.load(open(f"{root}/blobs/sha256/{digest}"))
[layer] = manifest["layers"]
print(layer["digest"].split(":", 1)[1], layer["size"])
EOF
)
tar_bytes="$(gzip -dc "$L/blobs/sha256/$layer_digest" | wc -c)"
unpacked_bytes="$(find "$rootfs" -type f -printf '%s\n' | awk '{ s += $1 } END { print s }')"

tar --sort=name --owner=0 --group=0 --numeric-owner --mtime="@$EPOCH" \
  -C "$L" -cf "$WORK/archive.tar" oci-layout index.json blobs
archive_bytes="$(stat -c %s "$WORK/archive.tar")"

rm -rf "$LAYOUT"
mv "$L" "$LAYOUT"
mv "$WORK/archive.tar" "$ARCHIVE"
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
{
  echo "image.sh: lameduck:$VERSION (revision $REVISION)"
  echo "image.sh:   binary:            $file_out"
  echo "image.sh:   compressed layer:  $layer_bytes bytes ($(mib "$layer_bytes"))"
  echo "image.sh:   uncompressed tar:  $tar_bytes bytes ($(mib "$tar_bytes"))"
  echo "image.sh:   unpacked (files):  $unpacked_bytes bytes ($(mib "$unpacked_bytes"))"
  echo "image.sh:   oci-archive:       $archive_bytes bytes ($(mib "$archive_bytes")) $ARCHIVE"
} >"$SUMMARY"
echo "$WANT" >"$STAMP"
cat "$SUMMARY" >&2
echo "layout=$LAYOUT"
echo "archive=$ARCHIVE"

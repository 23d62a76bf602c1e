#!/usr/bin/env bash
# Builds a minimal OpenTelemetry Collector for tests/otlp.rs: the core OTLP
# receiver and the contrib file exporter (its JSON lines are what the test
# reads; core's `debug` exporter only prints a human-readable dump), made with
# the collector's own builder (go.opentelemetry.io/collector/cmd/builder)
# from the Go module proxy, once, into
#   ${XDG_CACHE_HOME:-$HOME/.cache}/lameduck-tools/otelcol-<version>/
# A later run finds the stamp and returns at once; concurrent runs serialise
# on a flock, like scripts/k8s-build.sh. Prints the binary's path last.
set -euo pipefail

VERSION="v0.165.0"
TOOLS="${XDG_CACHE_HOME:-$HOME/.cache}/lameduck-tools"
DEST="$TOOLS/otelcol-$VERSION"
BIN="$DEST/otelcol-lameduck"
STAMP="$DEST/.stamp"

die() { printf 'otelcol-build.sh: FAIL: %s\n' "$*" >&2; exit 1; }

if [[ -f "$STAMP" && -x "$BIN" ]]; then echo "$BIN"; exit 0; fi
command -v go >/dev/null 2>&1 || die "go is not installed (needed to build the collector)"
command -v flock >/dev/null 2>&1 || die "flock (util-linux) is not installed"
mkdir -p "$DEST"
exec 9>"$TOOLS/otelcol-$VERSION.lock"
if ! flock -n 9; then
  echo "otelcol-build.sh: another build of the collector $VERSION is running; waiting for it" >&2
  flock 9
fi
if [[ -f "$STAMP" && -x "$BIN" ]]; then echo "$BIN"; exit 0; fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
t0=$SECONDS
export GOFLAGS="-mod=mod -buildvcs=false"
[[ -n "${GOTOOLCHAIN:-}" ]] || export GOTOOLCHAIN=auto
echo "otelcol-build.sh: building the collector $VERSION (otlp receiver, file exporter) into $DEST (once; a few minutes)" >&2

GOBIN="$WORK/bin" go install "go.opentelemetry.io/collector/cmd/builder@$VERSION" \
  || die "cannot install the collector builder $VERSION"
cat >"$WORK/builder.yaml" <<YAML
dist:
  name: otelcol-lameduck
  description: OTLP receiver and file exporter, for lameduck's tests
  output_path: $WORK/dist
receivers:
  - gomod: go.opentelemetry.io/collector/receiver/otlpreceiver $VERSION
exporters:
  - gomod: github.com/open-telemetry/opentelemetry-collector-contrib/exporter/fileexporter $VERSION
YAML
# Generate only: the builder's `go mod tidy` also resolves the test imports
# of every dependency, and some contrib test-only modules are not served by
# the proxy (403). `go build -mod=mod` resolves just what is compiled.
"$WORK/bin/builder" --config "$WORK/builder.yaml" --skip-get-modules --skip-compilation >"$WORK/build.log" 2>&1 \
  || { tail -40 "$WORK/build.log" >&2; die "the collector sources could not be generated"; }
(
  cd "$WORK/dist"
  [[ -f go.mod ]] || go mod init otelcol-lameduck
  # `go get` (unlike `go mod tidy`) resolves only the packages built; the
  # pinned components pull the matching collector core by their go.mod.
  go get "go.opentelemetry.io/collector/otelcol@$VERSION" \
    "go.opentelemetry.io/collector/receiver/otlpreceiver@$VERSION" \
    "github.com/open-telemetry/opentelemetry-collector-contrib/exporter/fileexporter@$VERSION"
  go build -trimpath -ldflags="-s -w" -o otelcol-lameduck .
) >>"$WORK/build.log" 2>&1 \
  || { tail -40 "$WORK/build.log" >&2; die "the collector build failed"; }
install -m 0755 "$WORK/dist/otelcol-lameduck" "$BIN"
"$BIN" components >/dev/null || die "the built collector does not start"
touch "$STAMP"
echo "otelcol-build.sh: done in $((SECONDS - t0))s" >&2
echo "$BIN"

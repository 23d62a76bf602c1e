#!/usr/bin/env bash
# The whole test suite, runnable on a fresh Debian/Ubuntu machine with Rust:
# installs the real components the tests drive (HAProxy, Prometheus and
# promtool, openssl, curl, Python's h11) when they are missing, builds the pinned
# Kubernetes control plane once (cached), then runs every test target and
# validates the Helm chart and manifests.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)
# Debian's prometheus package ships promtool too.
{ command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; } || missing+=(prometheus)
# The Kubernetes harness (tests/k8s) makes its certificates with openssl.
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
# tests/tls.rs: HTTPS over HTTP/1.1 and h2 (ALPN) with a real client.
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v h2load >/dev/null 2>&1 || missing+=(nghttp2-client)
command -v umoci >/dev/null 2>&1 || missing+=(umoci) # tests/image.rs: scripts/image.sh builds the OCI image with it
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing test dependencies: ${missing[*]}"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  # Wait for another apt/dpkg (unattended upgrades, a parallel job) rather than fail.
  apt=(-o DPkg::Lock::Timeout=600)
  $sudo apt-get "${apt[@]}" update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get "${apt[@]}" install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
export PATH="$PATH:/usr/sbin"
# The strict app behind lameduck in tests/smuggling.rs parses with h11 (pure Python).
python3 -c 'import h11' 2>/dev/null || python3 -m pip install --quiet 'h11==0.16.0'

# etcd, kube-apiserver, kube-controller-manager (+ scheduler, kubelet,
# kube-proxy, kubectl) for the tests in tests/k8s*: built from the Go module
# proxy once (cached, ~8 min cold on 2 cores), a no-op afterwards.
bash scripts/k8s-build.sh >/dev/null
# The OpenTelemetry Collector tests/otlp.rs exports to (OTLP receiver + file
# exporter), built from the Go module proxy once (cached), a no-op afterwards.
bash scripts/otelcol-build.sh >/dev/null
# The node half of the lab cluster (tests/lab): containerd, runc, crictl from
# the Go module proxy, CNI plugins and iptables from Debian, a pause image
# built from scratch (cached, ~2 min cold).
bash scripts/node-build.sh >/dev/null

cargo test --locked --all-targets --no-fail-fast "$@"

# The Kubernetes material: chart lint/render, manifest validation against the
# API types, and a replay of the rendered pod's deletion against the binary
# just built. Builds helm from the Go module proxy once (cached).
LAMEDUCK_BIN="$PWD/target/debug/lameduck" bash deploy/validate.sh

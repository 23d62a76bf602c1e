{{- define "injector.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "injector.fullname" -}}
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

{{- define "injector.selectorLabels" -}}
app.kubernetes.io/name: {{ include "injector.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "injector.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "injector.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "injector.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion | toString) -}}
{{- end -}}
{{- end }}

{{- define "injector.secretName" -}}
{{- .Values.certificates.secretName | default (printf "%s-tls" (include "injector.fullname" .)) -}}
{{- end }}

{{/*
The sidecar settings the injector is given: .Values.sidecar, with the image
defaulting to the injector's own.
*/}}
{{- define "injector.sidecarConfig" -}}
{{- $s := deepCopy (.Values.sidecar | default dict) -}}
{{- $img := deepCopy ($s.image | default dict) -}}
{{- if not $img.repository -}}
{{- $_ := set $img "repository" .Values.image.repository -}}
{{- if not (or $img.tag $img.digest) -}}
{{- $_ := set $img "tag" (.Values.image.tag | default .Chart.AppVersion | toString) -}}
{{- $_ := set $img "digest" (.Values.image.digest | default "") -}}
{{- end -}}
{{- end -}}
{{- $_ := set $s "image" $img -}}
{{- if and (not (hasKey $s "nativeSidecar")) (semverCompare "<1.29.0-0" .Capabilities.KubeVersion.Version) -}}
{{- $_ := set $s "nativeSidecar" false -}}
{{- end -}}
{{- toPrettyJson $s -}}
{{- end }}

{{/*
The serving certificate: (dict "cert" PEM "key" PEM "ca" PEM), all base64.
source=helm: the existing Secret's when there is one (so an upgrade, or a
GitOps tool comparing renders against the cluster, sees no change), else a
new CA and certificate.
*/}}
{{- define "injector.helmCertificate" -}}
{{- $secret := lookup "v1" "Secret" .Release.Namespace (include "injector.secretName" .) -}}
{{- if and $secret $secret.data (index $secret.data "tls.crt") (index $secret.data "ca.crt") -}}
{{- dict "cert" (index $secret.data "tls.crt") "key" (index $secret.data "tls.key") "ca" (index $secret.data "ca.crt") | toYaml -}}
{{- else -}}
{{- $svc := include "injector.fullname" . -}}
{{- $ns := .Release.Namespace -}}
{{- $days := int .Values.certificates.validityDays -}}
{{- $ca := genCA (printf "%s-ca" $svc) $days -}}
{{- $dns := list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.cluster.local" $svc $ns) -}}
{{- $cert := genSignedCert (printf "%s.%s.svc" $svc $ns) nil $dns $days $ca -}}
{{- dict "cert" ($cert.Cert | b64enc) "key" ($cert.Key | b64enc) "ca" ($ca.Cert | b64enc) | toYaml -}}
{{- end -}}
{{- end }}

{{/* The sidecars' RBAC rules, exactly those of deploy/rbac.yaml. */}}
{{- define "injector.sidecarRules" -}}
# Its own Pod (deletionTimestamp, terminationGracePeriodSeconds).
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get"]
# Only while draining: is an EndpointSlice still routing to the pod?
- apiGroups: ["discovery.k8s.io"]
  resources: ["endpointslices"]
  verbs: ["list", "watch"]
# The drain's Events on the Pod.
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}

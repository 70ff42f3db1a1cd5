{{/*
The chart name (nameOverride), truncated to 63 characters: the limit of a DNS-1123 label and of label values.
*/}}
{{- define "ms2mg.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full name of the operator's resources: fullnameOverride, else `<release>-<name>` (just the release name when
it already contains the chart name), truncated to 63 characters.
*/}}
{{- define "ms2mg.fullname" -}}
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

{{/*
`<chart>-<version>` for the helm.sh/chart label.
*/}}
{{- define "ms2mg.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Selector labels of the operator pod (immutable in a Deployment: never add to them).
*/}}
{{- define "ms2mg.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ms2mg.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/*
Common labels of every resource of the chart.
*/}}
{{- define "ms2mg.labels" -}}
helm.sh/chart: {{ include "ms2mg.chart" . }}
app.kubernetes.io/name: {{ include "ms2mg.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: ms2mg
{{- end }}

{{/*
The operator's ServiceAccount name.
*/}}
{{- define "ms2mg.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "ms2mg.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The converter pods' ServiceAccount name (the same in every namespace).
*/}}
{{- define "ms2mg.converterServiceAccountName" -}}
{{- if .Values.converterServiceAccount.create }}
{{- default (printf "%s-converter" (include "ms2mg.fullname" . | trunc 53 | trimSuffix "-")) .Values.converterServiceAccount.name }}
{{- else }}
{{- required "converterServiceAccount.name is required when converterServiceAccount.create is false (the ServiceAccount must exist in every namespace where conversions run)" .Values.converterServiceAccount.name }}
{{- end }}
{{- end }}

{{/*
The namespaces the converter ServiceAccount is created in: the release namespace, the watched namespaces and
converterServiceAccount.extraNamespaces, without duplicates. Returns a JSON list (use with fromJsonArray).
*/}}
{{- define "ms2mg.converterNamespaces" -}}
{{- $all := list .Release.Namespace }}
{{- $all = concat $all .Values.watchNamespaces .Values.converterServiceAccount.extraNamespaces }}
{{- $all | uniq | toJson }}
{{- end }}

{{/*
An image reference from {repository, tag, digest}: `repository@digest`, else `repository:tag` (tag defaults to the
appVersion). Call with (dict "image" .Values.image "context" $ "key" "image").
*/}}
{{- define "ms2mg.image" -}}
{{- if not (and (hasKey . "image") (hasKey . "context") (hasKey . "key")) }}
{{- fail "ms2mg.image: call with (dict \"image\" <values> \"context\" $ \"key\" \"<values key>\")" }}
{{- end }}
{{- $repository := required (printf "%s.repository is required" .key) .image.repository }}
{{- if .image.digest }}
{{- printf "%s@%s" $repository .image.digest }}
{{- else }}
{{- printf "%s:%s" $repository (default .context.Chart.AppVersion .image.tag) }}
{{- end }}
{{- end }}

{{/*
Checks of values that contradict each other (the schema checks each value on its own).
*/}}
{{- define "ms2mg.checkValues" -}}
{{- if and .Values.metrics.serviceMonitor.enabled (not .Values.metrics.enabled) }}
{{- fail "metrics.serviceMonitor.enabled needs metrics.enabled: there is no /metrics endpoint to scrape" }}
{{- end }}
{{- if and .Values.metrics.enabled (eq (int .Values.metrics.port) (int .Values.liveness.port)) }}
{{- fail (printf "metrics.port and liveness.port must differ (both are %v)" .Values.metrics.port) }}
{{- end }}
{{- $managed := include "ms2mg.managedEnvNames" . | fromJsonArray }}
{{- range .Values.extraEnv }}
{{- if has .name $managed }}
{{- fail (printf "extraEnv: %s is set by the chart from its values; change the value instead (docs/helm.md)" .name) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The environment variables the chart sets on the operator container (a JSON list).
*/}}
{{- define "ms2mg.managedEnvNames" -}}
{{- list "MS2MG_CONVERTER_IMAGE" "MS2MG_IMAGE_PULL_POLICY" "MS2MG_ALLOWED_IMAGES" "MS2MG_ALLOWED_SERVICE_ACCOUNTS" "MS2MG_WATCH_NAMESPACES" "MS2MG_CONVERTER_SERVICE_ACCOUNT" "MS2MG_LOG_FORMAT" "MS2MG_METRICS_PORT" "MS2MG_LIVENESS_PORT" "MS2MG_DEFAULT_BACKOFF_LIMIT" "MS2MG_DEFAULT_TTL_SECONDS_AFTER_FINISHED" "MS2MG_DEFAULT_ACTIVE_DEADLINE_SECONDS" "MS2MG_DEFAULT_RESOURCES" | toJson }}
{{- end }}

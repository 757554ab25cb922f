{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "orders-gateway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name: the release name, prefixed unless it already contains the chart name. */}}
{{- define "orders-gateway.fullname" -}}
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

{{- define "orders-gateway.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "orders-gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "orders-gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "orders-gateway.labels" -}}
helm.sh/chart: {{ include "orders-gateway.chart" . }}
{{ include "orders-gateway.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: gateway
app.kubernetes.io/part-of: orders-gateway
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "orders-gateway.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "orders-gateway.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "orders-gateway.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* Whether the Deployment can run more than one pod (then Redis is mandatory). */}}
{{- define "orders-gateway.multiReplica" -}}
{{- if or .Values.autoscaling.enabled (gt (int .Values.replicaCount) 1) }}true{{ end }}
{{- end }}

{{/*
Cross-field checks the JSON schema cannot express. Fails the render with one
line naming the values to fix.
*/}}
{{- define "orders-gateway.validate" -}}
{{- $v := .Values }}
{{- $drainMs := int64 $v.config.shutdownDrainMs }}
{{- $neededMs := add (mul (int64 $v.preStopSleepSeconds) 1000) $drainMs 5000 }}
{{- $graceMs := mul (int64 $v.terminationGracePeriodSeconds) 1000 }}
{{- if le $graceMs $neededMs }}
{{- fail (printf "terminationGracePeriodSeconds (%d s) must exceed preStopSleepSeconds (%d s) + config.shutdownDrainMs (%d ms) + 5 s of margin, i.e. be at least %d s" (int64 $v.terminationGracePeriodSeconds) (int64 $v.preStopSleepSeconds) $drainMs (add (div $neededMs 1000) 1)) }}
{{- end }}
{{- if not (or $v.secrets.jwtSecret.enabled $v.config.jwtJwksUrl) }}
{{- fail "no token verification configured: enable secrets.jwtSecret or set config.jwtJwksUrl" }}
{{- end }}
{{- if and (include "orders-gateway.multiReplica" .) (not $v.secrets.redisUrl.enabled) }}
{{- fail "more than one replica (replicaCount > 1 or autoscaling.enabled) needs Redis: enable secrets.redisUrl (the embedded broker is single-replica only)" }}
{{- end }}
{{- range $name, $ref := dict "jwtSecret" $v.secrets.jwtSecret "redisUrl" $v.secrets.redisUrl "databaseUrl" $v.secrets.databaseUrl "publishApiKey" $v.secrets.publishApiKey }}
{{- if and $ref.enabled (not (or $ref.secretName $v.secrets.existingSecret)) }}
{{- fail (printf "secrets.%s is enabled but neither secrets.%s.secretName nor secrets.existingSecret names a Secret" $name $name) }}
{{- end }}
{{- end }}
{{- if $v.autoscaling.enabled }}
{{- if gt (int $v.autoscaling.minReplicas) (int $v.autoscaling.maxReplicas) }}
{{- fail (printf "autoscaling.minReplicas (%d) must not exceed autoscaling.maxReplicas (%d)" (int $v.autoscaling.minReplicas) (int $v.autoscaling.maxReplicas)) }}
{{- end }}
{{- end }}
{{- if $v.podDisruptionBudget.enabled }}
{{- if and (not (kindIs "invalid" $v.podDisruptionBudget.maxUnavailable)) (not (kindIs "invalid" $v.podDisruptionBudget.minAvailable)) }}
{{- fail "podDisruptionBudget: set only one of maxUnavailable and minAvailable" }}
{{- end }}
{{- if and (kindIs "invalid" $v.podDisruptionBudget.maxUnavailable) (kindIs "invalid" $v.podDisruptionBudget.minAvailable) }}
{{- fail "podDisruptionBudget: set one of maxUnavailable and minAvailable" }}
{{- end }}
{{- end }}
{{- end }}

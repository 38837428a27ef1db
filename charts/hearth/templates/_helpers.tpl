{{/* Names and labels shared by every Hearth resource. */}}
{{- define "hearth.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "hearth.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* <fullname>-<component>, kept within 63 characters. */}}
{{- define "hearth.component" -}}
{{- printf "%s-%s" (include "hearth.fullname" .root | trunc (int (sub 62 (len .name))) | trimSuffix "-") .name -}}
{{- end -}}

{{- define "hearth.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "hearth.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: hearth
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels of one component: call with (dict "root" $ "name" "gateway"). */}}
{{- define "hearth.selectorLabels" -}}
app.kubernetes.io/name: {{ include "hearth.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .name }}
{{- end -}}

{{- define "hearth.componentLabels" -}}
{{ include "hearth.labels" .root }}
app.kubernetes.io/component: {{ .name }}
{{- end -}}

{{- define "hearth.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "hearth.adminSecretName" -}}
{{- default (include "hearth.component" (dict "root" . "name" "admin")) .Values.adminToken.existingSecret -}}
{{- end -}}

{{/* The Secret holding the agent-to-agent link's cluster token. */}}
{{- define "hearth.clusterSecretName" -}}
{{- .Values.nodeAgent.link.existingSecret | default (include "hearth.component" (dict "root" . "name" "cluster")) -}}
{{- end -}}

{{- define "hearth.redisHost" -}}
{{- include "hearth.component" (dict "root" . "name" "redis") -}}
{{- end -}}

{{- define "hearth.redisSecretName" -}}
{{- include "hearth.component" (dict "root" . "name" "redis") -}}
{{- end -}}

{{/* Fail early, with the value's name, on combinations the schema cannot express. */}}
{{- define "hearth.validate" -}}
{{- if and (not .Values.redis.enabled) (not .Values.redis.external.url) (not .Values.redis.external.existingSecret) -}}
{{- fail "redis.external.url (or redis.external.existingSecret) is required when redis.enabled is false" -}}
{{- end -}}
{{- if and .Values.gateway.metrics.serviceMonitor.enabled (not .Values.gateway.metrics.enabled) -}}
{{- fail "gateway.metrics.serviceMonitor.enabled needs gateway.metrics.enabled" -}}
{{- end -}}
{{- end -}}

{{/*
Environment every role shares: where Redis is (HEARTH_REDIS_URL, built from the password
Secret so the password never appears in the pod spec) and the pod's own identity.
*/}}
{{- define "hearth.commonEnv" -}}
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: HEARTH_NODE
  valueFrom:
    fieldRef:
      fieldPath: spec.nodeName
- name: HEARTH_STATE_DIR
  value: /var/lib/hearth
{{- if .Values.redis.enabled }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "hearth.redisSecretName" . }}
      key: password
- name: HEARTH_REDIS_URL
  value: {{ printf "redis://:$(REDIS_PASSWORD)@%s:6379/0" (include "hearth.redisHost" .) | quote }}
{{- else if .Values.redis.external.existingSecret }}
- name: HEARTH_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.external.existingSecret }}
      key: {{ .Values.redis.external.existingSecretKey }}
{{- else }}
- name: HEARTH_REDIS_URL
  value: {{ .Values.redis.external.url | quote }}
{{- end }}
{{- end -}}

{{/* Restricted-profile container security context (gateway, controller, tests). */}}
{{- define "hearth.restrictedContainer" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

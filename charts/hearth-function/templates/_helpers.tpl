{{- define "hearth-function.name" -}}
{{- $n := default .Release.Name .Values.name -}}
{{- if not (regexMatch "^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$" $n) -}}
{{- fail (printf "name: %q is not a DNS-1123 label (set `name`, or use a release name of lowercase letters, digits and '-', at most 63)" $n) -}}
{{- end -}}
{{- $n -}}
{{- end -}}

{{- define "hearth-function.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "hearth-function.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: hearth
app.kubernetes.io/component: function
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

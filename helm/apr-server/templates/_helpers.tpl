{{/*
apr-server.name: the chart name, or nameOverride; cut to 63 characters (a DNS label).
*/}}
{{- define "apr-server.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
apr-server.fullname: the prefix of every resource name: fullnameOverride, or the release name
followed by the chart name (once, if the release name already contains it); 63 characters at most.
*/}}
{{- define "apr-server.fullname" -}}
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
apr-server.chart: chart name and version, for the helm.sh/chart label.
*/}}
{{- define "apr-server.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
apr-server.selectorLabels: the labels that select the serving pods. Never change them after an
install (a Deployment's selector is immutable); the helm test pod has another component, so
neither the Service nor the PodDisruptionBudget ever picks it.
*/}}
{{- define "apr-server.selectorLabels" -}}
app.kubernetes.io/name: {{ include "apr-server.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: server
{{- end }}

{{/*
apr-server.baseLabels: the standard app.kubernetes.io/* labels, less the component.
*/}}
{{- define "apr-server.baseLabels" -}}
helm.sh/chart: {{ include "apr-server.chart" . }}
app.kubernetes.io/name: {{ include "apr-server.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: apr
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
apr-server.labels: the labels of every resource of the release (component: server).
*/}}
{{- define "apr-server.labels" -}}
{{ include "apr-server.baseLabels" . }}
app.kubernetes.io/component: server
{{- end }}

{{/*
apr-server.serviceAccountName: the ServiceAccount of the pod: the created one (default: the full
name), or an existing one named in serviceAccount.name (default: "default").
*/}}
{{- define "apr-server.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "apr-server.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
apr-server.image: "repository:tag" of the entry of .Values.image named by the argument; an
empty repository fails the install, naming the value (the project's own images are not
published yet: each is built from images/<name>.Dockerfile and pushed to the user's registry).
*/}}
{{- define "apr-server.image" -}}
{{- $name := index . 0 }}{{- $image := index . 1 }}
{{- $repository := required (printf "image.%s.repository is required: the project's images are not published yet; build it from images/ (see the chart README), push it to your registry and set it" $name) $image.repository }}
{{- printf "%s:%s" $repository $image.tag }}
{{- end }}

{{/*
apr-server.metricsSelector: the PromQL label matchers that pick this release's scrape targets
(prometheus-operator labels every series with the namespace and the Service it came through).
*/}}
{{- define "apr-server.metricsSelector" -}}
namespace="{{ .Release.Namespace }}",service="{{ include "apr-server.fullname" . }}"
{{- end }}

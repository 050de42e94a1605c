{{/*
apr-server.sglangContainer: the SGLang engine on the pod's GPU(s), serving the pulled model on
the pod's loopback, port 30000, with Prometheus metrics (passed on by the APR server). The probes follow SGLang's http_server.py: /health_generate
runs one decode step (startup), /ready says whether it takes requests, /health is cheap unless
sglang.livenessGenerates is set.
*/}}
{{- define "apr-server.sglangContainer" -}}
- name: sglang
  image: {{ include "apr-server.image" (list "sglang" .Values.image.sglang) }}
  imagePullPolicy: {{ .Values.image.sglang.pullPolicy }}
  command:
    - python3
    - -m
    - sglang.launch_server
    - --model-path
    - /models/current
    - --host
    - 127.0.0.1
    - --port
    - "30000"
    - --served-model-name
    - {{ include "apr-server.servedModelName" . }}
    - --enable-metrics
    - --allow-auto-truncate
    {{- range .Values.sglang.extraArgs }}
    - {{ . | quote }}
    {{- end }}
  env:
    # The root filesystem is read-only: SGLang's and its kernels' caches (Triton, FlashInfer,
    # DeepGEMM, torch) go under HOME, on the writable /tmp volume.
    - name: HOME
      value: /tmp
    - name: SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION
      value: {{ .Values.sglang.livenessGenerates | quote }}
    {{- with .Values.sglang.env }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  # SGLang listens on loopback and kubelet's httpGet probes dial the pod IP: each probe asks
  # from inside the container (a non-200 answer raises, the probe fails). Timeouts are above
  # SGLang's own 20 s wait for a generated token (SGLANG_HEALTH_CHECK_TIMEOUT).
  startupProbe:
    exec:
      command: {{ include "apr-server.sglangProbe" (dict "path" "/health_generate" "timeout" 25) }}
    periodSeconds: {{ .Values.sglang.startupProbe.periodSeconds }}
    failureThreshold: {{ .Values.sglang.startupProbe.failureThreshold }}
    timeoutSeconds: 30
  readinessProbe:
    exec:
      command: {{ include "apr-server.sglangProbe" (dict "path" "/ready" "timeout" 4) }}
    periodSeconds: 10
    failureThreshold: 3
    timeoutSeconds: 5
  livenessProbe:
    exec:
      command: {{ include "apr-server.sglangProbe" (dict "path" "/health" "timeout" 25) }}
    periodSeconds: 20
    failureThreshold: 3
    timeoutSeconds: 30
  resources:
    requests:
      {{- toYaml .Values.sglang.resources.requests | nindent 6 }}
    limits:
      {{- with .Values.sglang.resources.limits }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
      {{ .Values.sglang.gpu.resource }}: {{ .Values.sglang.gpu.count }}
  securityContext:
    {{- toYaml .Values.sglang.securityContext | nindent 4 }}
  volumeMounts:
    - name: models
      mountPath: /models
      readOnly: true
    - name: dshm
      mountPath: /dev/shm
    - name: sglang-tmp
      mountPath: /tmp
{{- end }}

{{/*
apr-server.sglangProbe: an exec probe's command, a GET of SGLang's `path` on loopback (JSON
list); urllib raises on any answer but 2xx, so the probe fails then.
*/}}
{{- define "apr-server.sglangProbe" -}}
["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:30000{{ .path }}', timeout={{ .timeout }})"]
{{- end }}

{{/*
apr-server.servedModelName: the model's name in SGLang's metrics (model_name) and /model_info:
model.servedName, else <name>-<version> from the uri (s3://b/models/apr-countdown/v1 gives
apr-countdown-v1), never a local path.
*/}}
{{- define "apr-server.servedModelName" -}}
{{- if .Values.model.servedName }}
{{- .Values.model.servedName }}
{{- else }}
{{- $parts := splitList "/" (trimSuffix "/" .Values.model.uri) }}
{{- $n := len $parts }}
{{- if ge $n 2 }}
{{- printf "%s-%s" (index $parts (sub $n 2)) (index $parts (sub $n 1)) }}
{{- else }}
{{- last $parts }}
{{- end }}
{{- end }}
{{- end }}

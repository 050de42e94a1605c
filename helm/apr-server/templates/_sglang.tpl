{{/*
apr-server.sglangContainer: the SGLang engine on the pod's GPU(s), serving the pulled model on
port 30000 with Prometheus metrics. The probes follow SGLang's http_server.py: /health_generate
runs one decode step (startup), /ready says whether it takes requests, /health is cheap unless
sglang.livenessGenerates is set.
*/}}
{{- define "apr-server.sglangContainer" -}}
- name: sglang
  image: {{ include "apr-server.image" .Values.image.sglang }}
  imagePullPolicy: {{ .Values.image.sglang.pullPolicy }}
  command:
    - python3
    - -m
    - sglang.launch_server
    - --model-path
    - /models/current
    - --host
    - 0.0.0.0
    - --port
    - "30000"
    - --enable-metrics
    - --allow-auto-truncate
    {{- range .Values.sglang.extraArgs }}
    - {{ . | quote }}
    {{- end }}
  env:
    - name: SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION
      value: {{ .Values.sglang.livenessGenerates | quote }}
    {{- with .Values.sglang.env }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  ports:
    - name: sglang
      containerPort: 30000
      protocol: TCP
  # Timeouts above SGLang's own 20 s wait for a generated token (SGLANG_HEALTH_CHECK_TIMEOUT).
  startupProbe:
    httpGet:
      path: /health_generate
      port: sglang
    periodSeconds: {{ .Values.sglang.startupProbe.periodSeconds }}
    failureThreshold: {{ .Values.sglang.startupProbe.failureThreshold }}
    timeoutSeconds: 30
  readinessProbe:
    httpGet:
      path: /ready
      port: sglang
    periodSeconds: 10
    failureThreshold: 3
    timeoutSeconds: 5
  livenessProbe:
    httpGet:
      path: /health
      port: sglang
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
{{- end }}

{{/*
apr-server.serverContainer: the APR server: the spawn/join loop, calling SGLang over loopback.
*/}}
{{- define "apr-server.serverContainer" -}}
- name: apr-server
  image: {{ include "apr-server.image" (list "serve" .Values.image.serve) }}
  imagePullPolicy: {{ .Values.image.serve.pullPolicy }}
  command:
    - apr
    - serve
    - --engine
    - sglang
    - --engine-url
    - http://127.0.0.1:30000
    - --host
    - 0.0.0.0
    - --port
    - "8000"
    - --max-concurrency
    - {{ .Values.server.maxConcurrency | quote }}
    - --request-timeout
    - {{ .Values.server.requestTimeoutSeconds | quote }}
    - --max-tokens
    - {{ .Values.server.maxTokens | quote }}
    {{- range .Values.server.extraArgs }}
    - {{ . | quote }}
    {{- end }}
  {{- if or .Values.server.auth.enabled .Values.server.env }}
  env:
    {{- if .Values.server.auth.enabled }}
    - name: APR_API_TOKEN
      valueFrom:
        secretKeyRef:
          name: {{ required "server.auth.existingSecret is required when server.auth.enabled" .Values.server.auth.existingSecret }}
          key: {{ .Values.server.auth.secretKey }}
    {{- end }}
    {{- with .Values.server.env }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- end }}
  ports:
    - name: http
      containerPort: 8000
      protocol: TCP
  readinessProbe:
    httpGet:
      path: /readyz
      port: http
    periodSeconds: 10
    failureThreshold: 3
    timeoutSeconds: 5
  livenessProbe:
    httpGet:
      path: /healthz
      port: http
    periodSeconds: 20
    failureThreshold: 3
    timeoutSeconds: 5
  resources:
    {{- toYaml .Values.server.resources | nindent 4 }}
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
  volumeMounts:
    - name: tmp
      mountPath: /tmp
{{- end }}

{{/*
apr-server.pullContainer: the init container that downloads the model into the `models` emptyDir
with `apr pull` (which checks every file against the artifact's manifest). The S3 credentials
come from a Secret, never from values, or from the pod's cloud role (`iam`), or there are none
(`anonymous`, a public bucket).
*/}}
{{- define "apr-server.pullContainer" -}}
- name: pull-model
  image: {{ include "apr-server.image" (list "apr" .Values.image.apr) }}
  imagePullPolicy: {{ .Values.image.apr.pullPolicy }}
  command: ["apr", "pull", "--uri", {{ required "model.uri is required: the published model to serve, e.g. --set model.uri=s3://apr-models/models/apr-countdown/v1" .Values.model.uri | quote }}, "--out", "/models/current"]
  env:
    - name: S3_ENDPOINT
      value: {{ .Values.model.s3.endpoint | quote }}
    - name: S3_CREDENTIALS
      value: {{ .Values.model.s3.credentials | quote }}
    {{- if eq .Values.model.s3.credentials "keys" }}
    - name: AWS_ACCESS_KEY_ID
      valueFrom:
        secretKeyRef:
          name: {{ .Values.model.s3.accessKey.secretName }}
          key: {{ .Values.model.s3.accessKey.secretKey }}
    - name: AWS_SECRET_ACCESS_KEY
      valueFrom:
        secretKeyRef:
          name: {{ .Values.model.s3.secretKey.secretName }}
          key: {{ .Values.model.s3.secretKey.secretKey }}
    {{- end }}
  resources:
    {{- toYaml .Values.model.pullResources | nindent 4 }}
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
  volumeMounts:
    - name: models
      mountPath: /models
    - name: tmp
      mountPath: /tmp
{{- end }}

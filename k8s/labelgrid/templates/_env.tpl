{{/* Env of each gRPC service beyond what they all share; called with the root context. */}}

{{- define "labelgrid.env.datastore" -}}
- name: LABELGRID_BACKEND
  value: {{ ternary "dicomweb" "s3" .Values.dicomweb.enabled }}
{{- /* The blob store: the bundled MinIO, an external S3, or none (a DICOMweb datastore without MinIO). */}}
{{- if or (include "labelgrid.minioEnabled" .) (eq .Values.storage.type "s3") }}
{{- if include "labelgrid.minioEnabled" . }}
- name: LABELGRID_S3_ENDPOINT
  value: {{ printf "%s:9000" (include "labelgrid.componentName" (dict "root" . "component" "minio")) | quote }}
- name: LABELGRID_S3_SECURE
  value: "false"
- name: LABELGRID_S3_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "labelgrid.minioSecretName" . }}
      key: root-user
- name: LABELGRID_S3_SECRET_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "labelgrid.minioSecretName" . }}
      key: root-password
{{- else }}
- name: LABELGRID_S3_ENDPOINT
  value: {{ .Values.storage.s3.endpoint | quote }}
- name: LABELGRID_S3_SECURE
  value: {{ .Values.storage.s3.secure | toString | quote }}
- name: LABELGRID_S3_REGION
  value: {{ .Values.storage.s3.region | quote }}
- name: LABELGRID_S3_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .Values.storage.s3.existingSecret }}
      key: {{ .Values.storage.s3.accessKeyKey }}
- name: LABELGRID_S3_SECRET_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .Values.storage.s3.existingSecret }}
      key: {{ .Values.storage.s3.secretKeyKey }}
{{- end }}
- name: LABELGRID_S3_BUCKET
  value: {{ .Values.storage.bucket | quote }}
- name: LABELGRID_S3_PREFIX
  value: {{ .Values.storage.prefix | quote }}
- name: LABELGRID_S3_CREATE_BUCKET
  value: {{ .Values.storage.createBucket | toString | quote }}
{{- if include "labelgrid.downloadRedirect" . }}
- name: LABELGRID_S3_PUBLIC_ENDPOINT
  value: {{ .Values.storage.publicEndpoint | quote }}
{{- end }}
{{- end }}
- name: LABELGRID_STATE_DIR
  value: /var/lib/labelgrid/datastore
{{- with (include "labelgrid.dicomwebDatastoreEnv" .) }}
{{ . | trim }}
{{- end }}
{{- if eq .Values.index.type "postgresql" }}
# The URL is composed by Kubernetes from the password Secret: no secret in the manifest.
- name: POSTGRES_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "labelgrid.postgresqlSecretName" . }}
      key: password
- name: LABELGRID_INDEX
  value: {{ printf "postgresql+psycopg://%s:$(POSTGRES_PASSWORD)@%s:5432/%s" .Values.postgresql.auth.username (include "labelgrid.componentName" (dict "root" . "component" "postgresql")) .Values.postgresql.auth.database | quote }}
{{- else if eq .Values.index.type "external" }}
- name: LABELGRID_INDEX
  valueFrom:
    secretKeyRef:
      name: {{ .Values.index.external.existingSecret }}
      key: {{ .Values.index.external.dsnKey }}
{{- end }}
{{- end -}}

{{- define "labelgrid.env.inference" -}}
- name: LABELGRID_DATASTORE
  value: {{ include "labelgrid.address" (dict "root" . "component" "datastore") | quote }}
- name: LABELGRID_DEVICE
  value: {{ .Values.inference.device | quote }}
- name: LABELGRID_WORK_DIR
  value: /var/lib/labelgrid/work
{{- $inference := .Values.inference }}
{{- if $inference.batch.fanOut }}
{{- /* Every ready pod, through the headless Service (round robin over its DNS answers). */}}
- name: LABELGRID_BATCH_ADDRESS
  value: {{ printf "dns:///%s" (include "labelgrid.address" (dict "root" . "component" "inference")) | quote }}
{{- $pods := ternary $inference.autoscaling.maxReplicas $inference.replicaCount (and $inference.autoscaling.enabled true) }}
{{- $gpus := ternary $inference.gpu.count 1 (and $inference.gpu.enabled true) }}
{{- $slots := $inference.config.concurrency_per_device | default 1 }}
- name: LABELGRID_BATCH_WIDTH
  value: {{ $inference.batch.width | default (mul 2 (int $pods) (int $gpus) (int $slots)) | toString | quote }}
{{- else if $inference.batch.width }}
- name: LABELGRID_BATCH_WIDTH
  value: {{ $inference.batch.width | toString | quote }}
{{- end }}
{{- with $inference.batching }}
{{- if ne (toString .maxBatchSize) "" }}
- name: LABELGRID_MAX_BATCH_SIZE
  value: {{ .maxBatchSize | toString | quote }}
{{- end }}
{{- if ne (toString .maxQueueDelayMs) "" }}
- name: LABELGRID_MAX_QUEUE_DELAY_MS
  value: {{ .maxQueueDelayMs | toString | quote }}
{{- end }}
{{- if .models }}
{{- $policies := dict }}
{{- range $model, $policy := .models }}
{{- $one := dict }}
{{- if hasKey $policy "maxBatchSize" }}{{ $_ := set $one "max_batch_size" $policy.maxBatchSize }}{{ end }}
{{- if hasKey $policy "maxQueueDelayMs" }}{{ $_ := set $one "max_queue_delay_ms" $policy.maxQueueDelayMs }}{{ end }}
{{- $_ := set $policies $model $one }}
{{- end }}
- name: LABELGRID_MODEL_BATCHING
  value: {{ toJson $policies | quote }}
{{- end }}
{{- end }}
{{ include "labelgrid.appEnv" . }}
{{- end -}}

{{- define "labelgrid.env.training" -}}
- name: LABELGRID_DATASTORE
  value: {{ include "labelgrid.address" (dict "root" . "component" "datastore") | quote }}
- name: LABELGRID_DEVICE
  value: {{ .Values.training.device | quote }}
- name: LABELGRID_WORK_DIR
  value: /var/lib/labelgrid/work
{{ include "labelgrid.appEnv" . }}
{{- end -}}

{{- define "labelgrid.env.activelearning" -}}
- name: LABELGRID_DATASTORE
  value: {{ include "labelgrid.address" (dict "root" . "component" "datastore") | quote }}
- name: LABELGRID_WORK_DIR
  value: /var/lib/labelgrid/work
{{ include "labelgrid.appEnv" . }}
{{- end -}}

{{/* "true" when image downloads are handed to S3 (storage.publicEndpoint on an S3 datastore), else empty. */}}
{{- define "labelgrid.downloadRedirect" -}}
{{- if and .Values.storage.publicEndpoint (not .Values.dicomweb.enabled) (or (include "labelgrid.minioEnabled" .) (eq .Values.storage.type "s3")) -}}
true
{{- end -}}
{{- end }}

{{/*
The DICOMweb backend (a PACS: Orthanc, DCM4CHEE, Google Healthcare; MONAI Label's --studies):
the same server and credentials for the datastore (images are its series, final labels go back
as DICOM SEG) and the gateway (/proxy/dicom for OHIF, infer output=dicom_seg). Credentials come
only from an existing Secret, never from values.
*/}}

{{- define "labelgrid.dicomwebEnv" -}}
{{- $d := .Values.dicomweb -}}
{{- if $d.enabled }}
{{- if not (regexMatch "^https?://" $d.url) }}
{{- fail "dicomweb.enabled needs dicomweb.url http(s)://HOST:PORT/dicom-web" }}
{{- end }}
- name: LABELGRID_DICOMWEB_URL
  value: {{ $d.url | quote }}
- name: LABELGRID_DICOMWEB_TIMEOUT_SECONDS
  value: {{ $d.timeoutSeconds | toString | quote }}
{{- if eq $d.auth "basic" }}
- name: LABELGRID_DICOMWEB_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ required "dicomweb.auth basic needs dicomweb.existingSecret" $d.existingSecret }}
      key: {{ $d.usernameKey }}
- name: LABELGRID_DICOMWEB_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $d.existingSecret }}
      key: {{ $d.passwordKey }}
{{- else if eq $d.auth "bearer" }}
- name: LABELGRID_DICOMWEB_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ required "dicomweb.auth bearer needs dicomweb.existingSecret" $d.existingSecret }}
      key: {{ $d.tokenKey }}
{{- end }}
{{- end }}
{{- end -}}

{{/* The datastore's own DICOMweb settings (with the shared ones above). */}}
{{- define "labelgrid.dicomwebDatastoreEnv" -}}
{{- $d := .Values.dicomweb -}}
{{- if $d.enabled }}
{{ include "labelgrid.dicomwebEnv" . }}
- name: LABELGRID_DICOMWEB_SEARCH_FILTER
  value: {{ toJson $d.searchFilter | quote }}
- name: LABELGRID_DICOMWEB_SYNC_SECONDS
  value: {{ $d.syncSeconds | toString | quote }}
{{- end }}
{{- end -}}

{{/* NetworkPolicy egress rule to the PACS (datastore and gateway). */}}
{{- define "labelgrid.dicomwebEgress" -}}
{{- if .Values.dicomweb.enabled }}
- {{- with .Values.dicomweb.egressTo }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  ports:
    {{- range .Values.dicomweb.egressPorts }}
    - port: {{ . }}
      protocol: TCP
    {{- end }}
{{- end }}
{{- end -}}

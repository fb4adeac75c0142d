{{/* vim: set filetype=mustache: */}}

{{- define "labelgrid.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "labelgrid.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 48 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 48 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 48 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* <fullname>-<component>; call with (dict "root" $ "component" "datastore"). */}}
{{- define "labelgrid.componentName" -}}
{{- printf "%s-%s" (include "labelgrid.fullname" .root) .component | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "labelgrid.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of every resource; call with (dict "root" $ "component" "datastore"). */}}
{{- define "labelgrid.labels" -}}
helm.sh/chart: {{ include "labelgrid.chart" .root }}
{{ include "labelgrid.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: labelgrid
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "labelgrid.selectorLabels" -}}
app.kubernetes.io/name: {{ include "labelgrid.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- if .component }}
app.kubernetes.io/component: {{ .component }}
{{- end }}
{{- end -}}

{{/* metadata.annotations of every resource, from commonAnnotations (and extra ones in .extra). */}}
{{- define "labelgrid.annotations" -}}
{{- $all := merge (dict) (.extra | default dict) .root.Values.commonAnnotations -}}
{{- with $all }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{- define "labelgrid.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "labelgrid.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The labelgrid image of a component; call with (dict "root" $ "values" .Values.inference). */}}
{{- define "labelgrid.image" -}}
{{- $global := .root.Values.image -}}
{{- $own := .values.image | default dict -}}
{{- $registry := $own.registry | default $global.registry -}}
{{- $repository := $own.repository | default $global.repository -}}
{{- if $global.digest -}}
{{- printf "%s/%s@%s" $registry $repository $global.digest -}}
{{- else if $own.tag -}}
{{- printf "%s/%s:%s" $registry $repository ($own.tag | toString) -}}
{{- else -}}
{{- $tag := $global.tag | default .root.Chart.AppVersion | toString -}}
{{- if and .values.gpu .values.gpu.enabled -}}
{{- $tag = printf "%s%s" $tag $global.gpuTagSuffix -}}
{{- end -}}
{{- printf "%s/%s:%s" $registry $repository $tag -}}
{{- end -}}
{{- end -}}

{{- define "labelgrid.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Pod security context: the defaults merged with a component's overrides (.values). */}}
{{- define "labelgrid.podSecurityContext" -}}
{{- toYaml (mergeOverwrite (deepCopy .root.Values.podSecurityContext) (.values.podSecurityContext | default dict)) -}}
{{- end -}}

{{- define "labelgrid.containerSecurityContext" -}}
{{- toYaml (mergeOverwrite (deepCopy .root.Values.containerSecurityContext) (.values.containerSecurityContext | default dict)) -}}
{{- end -}}

{{/* Resources with the GPU limit added when gpu.enabled; call with the component values. */}}
{{- define "labelgrid.resources" -}}
{{- $resources := deepCopy (.resources | default dict) -}}
{{- if and .gpu .gpu.enabled -}}
{{- $limits := $resources.limits | default dict -}}
{{- $_ := set $limits .gpu.resourceName (int .gpu.count) -}}
{{- $_ := set $resources "limits" $limits -}}
{{- end -}}
{{- toYaml $resources -}}
{{- end -}}

{{/* Affinity: the component's own, else the anti-affinity preset; call with (dict "root" $ "component" name "values" v). */}}
{{- define "labelgrid.affinity" -}}
{{- if .values.affinity -}}
{{- toYaml .values.affinity -}}
{{- else if eq .values.podAntiAffinityPreset "hard" -}}
podAntiAffinity:
  requiredDuringSchedulingIgnoredDuringExecution:
    - topologyKey: kubernetes.io/hostname
      labelSelector:
        matchLabels:
          {{- include "labelgrid.selectorLabels" . | nindent 10 }}
{{- else if eq .values.podAntiAffinityPreset "soft" -}}
podAntiAffinity:
  preferredDuringSchedulingIgnoredDuringExecution:
    - weight: 1
      podAffinityTerm:
        topologyKey: kubernetes.io/hostname
        labelSelector:
          matchLabels:
            {{- include "labelgrid.selectorLabels" . | nindent 12 }}
{{- end -}}
{{- end -}}

{{/* One probe: custom wins, else the component's settings with the given handler (YAML).
Liveness and startup probes must have successThreshold 1 (.one). */}}
{{- define "labelgrid.probe" -}}
{{- if .custom -}}
{{- toYaml .custom -}}
{{- else -}}
{{- .handler }}
initialDelaySeconds: {{ .settings.initialDelaySeconds }}
periodSeconds: {{ .settings.periodSeconds }}
timeoutSeconds: {{ .settings.timeoutSeconds }}
failureThreshold: {{ .settings.failureThreshold }}
successThreshold: {{ if .one }}1{{ else }}{{ .settings.successThreshold }}{{ end }}
{{- end -}}
{{- end -}}

{{/* The three probes of a container; call with (dict "values" v "handler" "<yaml>"). */}}
{{- define "labelgrid.probes" -}}
{{- $v := .values -}}
{{- if or $v.customStartupProbe $v.startupProbe.enabled }}
startupProbe:
  {{- include "labelgrid.probe" (dict "custom" $v.customStartupProbe "settings" $v.startupProbe "handler" .handler "one" true) | nindent 2 }}
{{- end }}
{{- if or $v.customLivenessProbe $v.livenessProbe.enabled }}
livenessProbe:
  {{- include "labelgrid.probe" (dict "custom" $v.customLivenessProbe "settings" $v.livenessProbe "handler" .handler "one" true) | nindent 2 }}
{{- end }}
{{- if or $v.customReadinessProbe $v.readinessProbe.enabled }}
readinessProbe:
  {{- include "labelgrid.probe" (dict "custom" $v.customReadinessProbe "settings" $v.readinessProbe "handler" .handler "one" false) | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Settings as LABELGRID_<KEY> env vars. */}}
{{- define "labelgrid.configEnv" -}}
{{- range $key, $value := . }}
- name: {{ printf "LABELGRID_%s" ($key | upper) }}
  value: {{ $value | toString | quote }}
{{- end }}
{{- end -}}

{{/* Env every labelgrid process shares: logging, HOME and caches on the writable /tmp, auth. */}}
{{- define "labelgrid.commonEnv" -}}
- name: LABELGRID_LOG_LEVEL
  value: {{ .Values.logLevel | quote }}
- name: LABELGRID_LOG_FORMAT
  value: {{ .Values.logFormat | quote }}
- name: HOME
  value: /tmp
- name: XDG_CACHE_HOME
  value: /tmp/.cache
- name: MPLCONFIGDIR
  value: /tmp/.cache/matplotlib
- name: PYTHONDONTWRITEBYTECODE
  value: "1"
{{- if and .Values.auth.enabled (or .Values.auth.existingSecret .Values.auth.tokens) }}
- name: LABELGRID_AUTH_TOKENS
  valueFrom:
    secretKeyRef:
      name: {{ include "labelgrid.authSecretName" . }}
      key: {{ include "labelgrid.authSecretKey" . }}
{{- end }}
{{- end -}}

{{/* Auth env of one component (dict root, component): the signing key, every service's token
     (so each server knows them all), and the component's own token; the gateway's users file. */}}
{{- define "labelgrid.authEnv" -}}
{{- $root := .root -}}
{{- if $root.Values.auth.enabled }}
{{- $keys := include "labelgrid.authKeysSecretName" $root }}
- name: LABELGRID_AUTH_SIGNING_KEY
  valueFrom:
    secretKeyRef:
      name: {{ $root.Values.auth.signingKey.existingSecret | default $keys }}
      key: {{ ternary $root.Values.auth.signingKey.existingSecretKey "signing-key" (not (empty $root.Values.auth.signingKey.existingSecret)) }}
{{- range $service := list "gateway" "inference" "training" "activelearning" }}
- name: LG_SERVICE_TOKEN_{{ upper $service }}
  valueFrom:
    secretKeyRef:
      name: {{ $keys }}
      key: {{ $service }}
{{- end }}
- name: LABELGRID_AUTH_SERVICES
  value: "gateway=$(LG_SERVICE_TOKEN_GATEWAY),inference=$(LG_SERVICE_TOKEN_INFERENCE),training=$(LG_SERVICE_TOKEN_TRAINING),activelearning=$(LG_SERVICE_TOKEN_ACTIVELEARNING)"
{{- if has .component (list "gateway" "inference" "training" "activelearning") }}
- name: LABELGRID_AUTH_SERVICE_TOKEN
  value: "$(LG_SERVICE_TOKEN_{{ upper .component }})"
{{- end }}
{{- with $root.Values.auth.oidc }}
{{- if .issuer }}
- name: LABELGRID_AUTH_OIDC_ISSUER
  value: {{ .issuer | quote }}
- name: LABELGRID_AUTH_OIDC_JWKS
  value: {{ .jwks | quote }}
{{- if .audience }}
- name: LABELGRID_AUTH_OIDC_AUDIENCE
  value: {{ .audience | quote }}
{{- end }}
- name: LABELGRID_AUTH_OIDC_USERNAME_CLAIM
  value: {{ .usernameClaim | quote }}
- name: LABELGRID_AUTH_OIDC_ROLES_CLAIM
  value: {{ .rolesClaim | quote }}
{{- end }}
{{- end }}
{{- if and (eq .component "gateway") $root.Values.auth.oidc.issuer $root.Values.auth.oidc.loginUrl }}
- name: LABELGRID_AUTH_OIDC_LOGIN_URL
  value: {{ $root.Values.auth.oidc.loginUrl | quote }}
{{- end }}
{{- if and (eq .component "gateway") $root.Values.auth.users.existingSecret }}
- name: LABELGRID_AUTH_USERS_FILE
  value: /etc/labelgrid/auth/users.json
- name: LABELGRID_AUTH_ACCESS_TTL_SECONDS
  value: {{ $root.Values.auth.tokenTTLSeconds | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{- define "labelgrid.authKeysSecretName" -}}
{{- include "labelgrid.componentName" (dict "root" . "component" "auth-keys") -}}
{{- end -}}

{{- define "labelgrid.authSecretName" -}}
{{- .Values.auth.existingSecret | default (include "labelgrid.componentName" (dict "root" . "component" "auth")) -}}
{{- end -}}

{{- define "labelgrid.authSecretKey" -}}
{{- if .Values.auth.existingSecret -}}{{ .Values.auth.existingSecretKey }}{{- else -}}tokens{{- end -}}
{{- end -}}

{{/* App on PYTHONPATH (volume or ConfigMap) and LABELGRID_APP, for inference and training. */}}
{{- define "labelgrid.appEnv" -}}
- name: LABELGRID_APP
  value: {{ .Values.app.module | quote }}
{{- if or .Values.app.volume .Values.app.files }}
- name: PYTHONPATH
  value: {{ .Values.app.mountPath | quote }}
{{- end }}
{{- end -}}

{{- define "labelgrid.appVolumeMounts" -}}
{{- if .Values.app.volume }}
- name: app
  mountPath: {{ .Values.app.mountPath }}
  readOnly: true
{{- end }}
{{- if .Values.app.files }}
- name: app-files
  mountPath: {{ printf "%s/%s" .Values.app.mountPath .Values.app.package }}
  readOnly: true
{{- end }}
{{- end -}}

{{- define "labelgrid.appVolumes" -}}
{{- if .Values.app.volume }}
- name: app
  {{- toYaml .Values.app.volume | nindent 2 }}
{{- end }}
{{- if .Values.app.files }}
- name: app-files
  configMap:
    name: {{ include "labelgrid.componentName" (dict "root" . "component" "app") }}
{{- end }}
{{- end -}}

{{/* gRPC address of a component (Service DNS name and port). */}}
{{- define "labelgrid.address" -}}
{{- $values := index .root.Values .component -}}
{{- printf "%s:%d" (include "labelgrid.componentName" (dict "root" .root "component" (printf "%s-headless" .component))) (int $values.port) -}}
{{- end -}}

{{/* "true" when the bundled MinIO is deployed: storage.type minio, and not beside a DICOMweb
datastore (which keeps no blobs in it) unless minio.withDicomweb asks for it; else "". */}}
{{- define "labelgrid.minioEnabled" -}}
{{- if and (eq .Values.storage.type "minio") (or (not .Values.dicomweb.enabled) .Values.minio.withDicomweb) }}true{{ end -}}
{{- end -}}

{{/* The S3 endpoint Envoy fetches downloads from (gateway.edge.s3Downloads): the bundled MinIO, or an
external S3 reached over plain http; else empty (downloads stream through the gateway). */}}
{{- define "labelgrid.edgeS3Endpoint" -}}
{{- if and .Values.gateway.edge.s3Downloads (not .Values.dicomweb.enabled) -}}
{{- if include "labelgrid.minioEnabled" . -}}
{{- printf "%s:9000" (include "labelgrid.componentName" (dict "root" . "component" "minio")) -}}
{{- else if and (eq .Values.storage.type "s3") (not .Values.storage.s3.secure) (not (hasPrefix "https://" .Values.storage.s3.endpoint)) -}}
{{- .Values.storage.s3.endpoint -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "labelgrid.minioSecretName" -}}
{{- .Values.minio.auth.existingSecret | default (include "labelgrid.componentName" (dict "root" . "component" "minio")) -}}
{{- end -}}

{{- define "labelgrid.postgresqlSecretName" -}}
{{- .Values.postgresql.auth.existingSecret | default (include "labelgrid.componentName" (dict "root" . "component" "postgresql")) -}}
{{- end -}}

{{/* A password kept across upgrades: the existing Secret's value, else the given one, else random. */}}
{{- define "labelgrid.password" -}}
{{- $existing := lookup "v1" "Secret" .root.Release.Namespace .secret -}}
{{- if and $existing $existing.data (hasKey $existing.data .key) -}}
{{- index $existing.data .key -}}
{{- else if .value -}}
{{- .value | b64enc -}}
{{- else -}}
{{- randAlphaNum 32 | b64enc -}}
{{- end -}}
{{- end -}}

{{/* Checks of values the schema cannot express. */}}
{{- define "labelgrid.validate" -}}
{{- if and (eq .Values.storage.type "s3") (not .Values.storage.s3.endpoint) -}}
{{- fail "storage.type=s3 needs storage.s3.endpoint (HOST:PORT)" -}}
{{- end -}}
{{- if and (eq .Values.storage.type "s3") (not .Values.storage.s3.existingSecret) -}}
{{- fail "storage.type=s3 needs storage.s3.existingSecret (credentials are never taken inline)" -}}
{{- end -}}
{{- if and (eq .Values.index.type "external") (not .Values.index.external.existingSecret) -}}
{{- fail "index.type=external needs index.external.existingSecret holding the SQLAlchemy URL" -}}
{{- end -}}
{{- if and (eq .Values.index.type "sqlite") .Values.datastore.autoscaling.enabled -}}
{{- fail "index.type=sqlite runs one datastore replica: datastore.autoscaling needs postgresql or external" -}}
{{- end -}}
{{- if and .Values.auth.enabled (not .Values.auth.existingSecret) (not .Values.auth.tokens) (not .Values.auth.users.existingSecret) (not .Values.auth.oidc.issuer) -}}
{{- fail "auth.enabled needs users (auth.users.existingSecret), an OIDC issuer (auth.oidc.issuer) or static tokens (auth.existingSecret or auth.tokens)" -}}
{{- end -}}
{{- if and .Values.auth.oidc.issuer (not .Values.auth.oidc.jwks) -}}
{{- fail "auth.oidc.issuer needs auth.oidc.jwks (the issuer's keys)" -}}
{{- end -}}
{{- end -}}

{{/* Egress to the OIDC issuer (its keys, and the login for the gateway), when one is set. */}}
{{- define "labelgrid.oidcEgress" -}}
{{- if and .Values.auth.enabled .Values.auth.oidc.issuer }}
- {{- with .Values.auth.oidc.egressTo }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  ports:
    {{- range .Values.auth.oidc.egressPorts }}
    - port: {{ . }}
      protocol: TCP
    {{- end }}
{{- end }}
{{- if and .Values.auth.enabled .Values.auth.tokens (not (compact .Values.auth.tokens)) -}}
{{- fail "auth.tokens holds only empty tokens: refusing to render auth that would be off" -}}
{{- end -}}
{{- if and .Values.app.files (not .Values.app.package) -}}
{{- fail "app.files needs app.package (the package directory the files form)" -}}
{{- end -}}
{{- if and .Values.ingress.enabled (eq .Values.gateway.service.type "LoadBalancer") -}}
{{- fail "expose the edge either by ingress.enabled or by gateway.service.type=LoadBalancer, not both" -}}
{{- end -}}
{{- end -}}

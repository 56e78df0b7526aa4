{{/*
Chart name, truncated to 63 characters (a DNS label).
*/}}
{{- define "petals-chat.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: the prefix of every resource. Truncated so that "<fullname>-inference-<i>" (pod and host names)
stays a DNS label.
*/}}
{{- define "petals-chat.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Chart name and version, for the helm.sh/chart label.
*/}}
{{- define "petals-chat.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels.
*/}}
{{- define "petals-chat.labels" -}}
helm.sh/chart: {{ include "petals-chat.chart" . }}
{{ include "petals-chat.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: petals-chat
{{- end }}

{{/*
Selector labels (the release's pods).
*/}}
{{- define "petals-chat.selectorLabels" -}}
app.kubernetes.io/name: {{ include "petals-chat.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Labels of one component: (dict "ctx" $ "component" "gateway").
*/}}
{{- define "petals-chat.componentLabels" -}}
{{ include "petals-chat.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
Selector labels of one component: (dict "ctx" $ "component" "gateway").
*/}}
{{- define "petals-chat.componentSelectorLabels" -}}
{{ include "petals-chat.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
Image reference: (dict "ctx" $ "name" "petals-chat-gateway").
*/}}
{{- define "petals-chat.image" -}}
{{- $tag := default .ctx.Chart.AppVersion .ctx.Values.image.tag }}
{{- if .ctx.Values.image.registry }}
{{- printf "%s/%s:%s" (trimSuffix "/" .ctx.Values.image.registry) .name $tag }}
{{- else }}
{{- printf "%s:%s" .name $tag }}
{{- end }}
{{- end }}

{{/*
ServiceAccount name.
*/}}
{{- define "petals-chat.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "petals-chat.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Restricted pod security context (Pod Security Standards "restricted").
*/}}
{{- define "petals-chat.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/*
Restricted container security context.
*/}}
{{- define "petals-chat.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/*
HTTP probes of a service (GET /healthz alive, GET /readyz ready).
*/}}
{{- define "petals-chat.webProbes" -}}
readinessProbe:
  httpGet:
    path: /readyz
    port: http
  periodSeconds: 5
  timeoutSeconds: 3
  failureThreshold: 3
livenessProbe:
  httpGet:
    path: /healthz
    port: http
  periodSeconds: 10
  timeoutSeconds: 5
  failureThreshold: 6
{{- end }}

{{/*
The swarm's INITIAL_PEERS for the inference replicas (space separated).
*/}}
{{- define "petals-chat.initialPeers" -}}
{{- if .Values.model.initialPeers }}
{{- join " " .Values.model.initialPeers }}
{{- else if .Values.swarm.enabled }}
{{- required "swarm.enabled needs swarm.bootstrapPeer (the first server's full multiaddr, see values.yaml) or model.initialPeers" .Values.swarm.bootstrapPeer }}
{{- end }}
{{- end }}

{{/*
INFERENCE_REPLICAS of the gateway: "<pod>=http://<pod>.<headless service>.<namespace>.svc.cluster.local:8080 ...".
*/}}
{{- define "petals-chat.inferenceReplicas" -}}
{{- $fullname := include "petals-chat.fullname" . }}
{{- $entries := list }}
{{- range $i := until (int .Values.inference.replicas) }}
{{- $pod := printf "%s-inference-%d" $fullname $i }}
{{- $entries = append $entries (printf "%s=http://%s.%s-inference.%s.svc.cluster.local:8080" $pod $pod $fullname $.Release.Namespace) }}
{{- end }}
{{- join " " $entries }}
{{- end }}

{{/*
CPUs a resources block grants, rounded up, at least 1: the cpu limit, else the request, else 1.
Accepts "500m", "2", 2 or 1.5.
*/}}
{{- define "petals-chat.grantedCpus" -}}
{{- $cpu := toString (coalesce (dig "limits" "cpu" "" .) (dig "requests" "cpu" "" .) "1") -}}
{{- if hasSuffix "m" $cpu -}}
{{- max 1 (div (add (atoi (trimSuffix "m" $cpu)) 999) 1000) -}}
{{- else -}}
{{- max 1 (int (ceil (float64 $cpu))) -}}
{{- end -}}
{{- end }}

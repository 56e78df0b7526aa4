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
The models, with every default applied, as a JSON list (use: include "petals-chat.models" . | fromJsonArray).
Each entry: name, key, path, description, dhtPrefix, torchDtype, hfHubOffline, chat, the resource names
(inferenceName, swarmName; inferenceName also names the model's headless Service), inference {replicas, variant,
resources, extraEnv, autoscaling (inference.autoscaling with the model's own over it), discovery (dns://<its headless
Service>:8080)}, private (whether it has private servers), swarm {servers, variant, resources, attnCacheTokens,
bootstrapHost}, and initialPeers (the INITIAL_PEERS of its replicas, space separated; empty: the public swarm).
*/}}
{{- define "petals-chat.models" -}}
{{- $fullname := include "petals-chat.fullname" . }}
{{- $namespace := .Release.Namespace }}
{{- $out := list }}
{{- $keys := dict }}
{{- $names := dict }}
{{- range $i, $m := .Values.models }}
{{- $key := $m.key | default (regexReplaceAll "[^a-z0-9]+" (lower $m.name) "-" | trunc 20 | trimAll "-") }}
{{- if not $key }}
{{- fail (printf "models[%d]: no DNS label can be derived from name %q: set models[%d].key" $i $m.name $i) }}
{{- end }}
{{- if hasKey $keys $key }}
{{- fail (printf "models[%d]: key %q is used by two models: set models[].key" $i $key) }}
{{- end }}
{{- if hasKey $names $m.name }}
{{- fail (printf "models[%d]: name %q is used by two models" $i $m.name) }}
{{- end }}
{{- $_ := set $keys $key true }}
{{- $_ := set $names $m.name true }}
{{- $inf := $m.inference | default dict }}
{{- $variant := $inf.variant | default $.Values.inference.variant }}
{{- $resources := deepCopy ($inf.resources | default (index $.Values.inference.resources $variant)) }}
{{- $sw := $m.swarm | default dict }}
{{- $servers := $sw.servers | default list }}
{{- $private := and $.Values.swarm.enabled (gt (len $servers) 0) (empty $m.initialPeers) }}
{{- $swarmVariant := $sw.variant | default $.Values.swarm.variant }}
{{- $inferenceName := printf "%s-inference-%s" $fullname $key }}
{{- $swarmName := printf "%s-swarm-%s" $fullname $key }}
{{- $statefulSets := list $inferenceName }}
{{- if $private }}
{{- $statefulSets = append $statefulSets (printf "%s-%d" $swarmName (sub (len $servers) 1)) }}
{{- end }}
{{- range $name := $statefulSets }}
{{- if gt (len $name) 52 }}
{{- fail (printf "models[%d]: the StatefulSet name %q is longer than 52 characters: use a shorter models[%d].key or fullnameOverride" $i $name $i) }}
{{- end }}
{{- end }}
{{- $dhtPrefix := $m.dhtPrefix | default (ternary $key "" $private) }}
{{- if and (hasPrefix "/" $m.path) (not $dhtPrefix) }}
{{- fail (printf "models[%d]: the local path %s needs a dhtPrefix (Petals derives none from a path)" $i $m.path) }}
{{- end }}
{{- $bootstrapHost := printf "%s-0-0.%s-swarm.%s.svc.cluster.local" $swarmName $fullname $namespace }}
{{- $initialPeers := "" }}
{{- if $m.initialPeers }}
{{- $initialPeers = join " " $m.initialPeers }}
{{- else if $private }}
{{- $initialPeers = printf "/dns4/%s/tcp/31337/p2p/derived:%s" $bootstrapHost $key }}
{{- end }}
{{- $autoscaling := include "petals-chat.overlay" (dict "base" $.Values.inference.autoscaling "over" ($inf.autoscaling | default dict)) | fromJson }}
{{- include "petals-chat.checkAutoscaling" (dict "index" $i "name" $m.name "autoscaling" $autoscaling) }}
{{- $discovery := printf "dns://%s.%s.svc.cluster.local:8080" $inferenceName $namespace }}
{{- $out = append $out (dict
    "name" $m.name "key" $key "path" $m.path "description" ($m.description | default "")
    "dhtPrefix" $dhtPrefix "torchDtype" ($m.torchDtype | default "float32") "hfHubOffline" ($m.hfHubOffline | default false)
    "chat" ($m.chat | default dict) "inferenceName" $inferenceName "swarmName" $swarmName
    "inference" (dict "replicas" (int ($inf.replicas | default $.Values.inference.replicas)) "variant" $variant "resources" $resources
      "extraEnv" ($inf.extraEnv | default list) "autoscaling" $autoscaling "discovery" $discovery)
    "private" $private "initialPeers" $initialPeers
    "swarm" (dict "servers" $servers "variant" $swarmVariant "bootstrapHost" $bootstrapHost
      "resources" (deepCopy ($sw.resources | default (index $.Values.swarm.resources $swarmVariant)))
      "attnCacheTokens" ($sw.attnCacheTokens | default $.Values.swarm.attnCacheTokens))) }}
{{- end }}
{{- toJson $out }}
{{- end }}

{{/*
Whether any model has private servers ("true" or empty).
*/}}
{{- define "petals-chat.privateSwarm" -}}
{{- range $m := include "petals-chat.models" . | fromJsonArray }}
{{- if $m.private }}true{{ end }}
{{- end }}
{{- end }}

{{/*
Name of the Secret holding the private swarm's seed.
*/}}
{{- define "petals-chat.seedSecretName" -}}
{{- .Values.swarm.seedSecret | default (printf "%s-swarm-seed" (include "petals-chat.fullname" .)) }}
{{- end }}

{{/*
Resources of a container with its variant: (dict "resources" $r "gpu" true): nvidia.com/gpu: 1 added for a gpu.
*/}}
{{- define "petals-chat.variantResources" -}}
{{- $resources := deepCopy .resources }}
{{- if .gpu }}
{{- $limits := default dict $resources.limits }}
{{- $_ := set $limits "nvidia.com/gpu" 1 }}
{{- $_ := set $resources "limits" $limits }}
{{- end }}
{{- toYaml $resources }}
{{- end }}

{{/*
A values block with another over it, two levels deep (a value set there wins, false and 0 included; a map is
merged key by key): (dict "base" $defaults "over" $overrides), as JSON.
*/}}
{{- define "petals-chat.overlay" -}}
{{- $out := deepCopy .base }}
{{- range $key, $value := .over }}
{{- if and (kindIs "map" $value) (kindIs "map" (index $out $key)) }}
{{- $inner := deepCopy (index $out $key) }}
{{- range $innerKey, $innerValue := $value }}
{{- $_ := set $inner $innerKey $innerValue }}
{{- end }}
{{- $_ := set $out $key $inner }}
{{- else }}
{{- $_ := set $out $key $value }}
{{- end }}
{{- end }}
{{- toJson $out }}
{{- end }}

{{/*
Fails on a model's autoscaling that cannot work: (dict "index" $i "name" $name "autoscaling" $a).
*/}}
{{- define "petals-chat.checkAutoscaling" -}}
{{- $a := .autoscaling }}
{{- if $a.enabled }}
{{- $where := printf "models[%d] (%s): inference.autoscaling" .index .name }}
{{- if and (eq (int $a.minReplicas) 0) (ne $a.engine "keda") }}
{{- fail (printf "%s: minReplicas 0 (scale to zero) needs engine keda (an HPA keeps at least 1)" $where) }}
{{- end }}
{{- if lt (int $a.maxReplicas) (max 1 (int $a.minReplicas)) }}
{{- fail (printf "%s: maxReplicas %d is below minReplicas %d (or 1)" $where (int $a.maxReplicas) (int $a.minReplicas)) }}
{{- end }}
{{- if not (or (gt (float64 $a.targets.sessionUtilization) 0.0) (gt (float64 $a.targets.requestsRunning) 0.0) (gt (float64 $a.targets.requestsWaiting) 0.0)) }}
{{- fail (printf "%s: every target is 0: set targets.sessionUtilization, requestsRunning or requestsWaiting" $where) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
INFERENCE_DISCOVERY of the gateway: "<model name>=dns://<the model's headless Service>:8080 ..." for every model.
*/}}
{{- define "petals-chat.inferenceDiscovery" -}}
{{- $entries := list }}
{{- range $m := include "petals-chat.models" . | fromJsonArray }}
{{- $entries = append $entries (printf "%s=%s" $m.name $m.inference.discovery) }}
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

{{/*
DEFAULT_MODEL of the gateway: gateway.defaultModel (one of the models' names) or the first model's name.
*/}}
{{- define "petals-chat.defaultModel" -}}
{{- $names := list }}
{{- range $m := .Values.models }}
{{- $names = append $names $m.name }}
{{- end }}
{{- $default := .Values.gateway.defaultModel | default (first $names) }}
{{- if not (has $default $names) }}
{{- fail (printf "gateway.defaultModel %q is none of the models (%s)" $default (join ", " $names)) }}
{{- end }}
{{- $default }}
{{- end }}

{{/*
Name of the Secret holding the gateway's API keys (key "keys": one id:key line each).
*/}}
{{- define "petals-chat.apiKeysSecretName" -}}
{{- .Values.gateway.apiKeys.existingSecret | default (printf "%s-api-keys" (include "petals-chat.fullname" .)) }}
{{- end }}

{{/*
The autoscaling signals a model's targets turn on (those above 0), as a JSON list of {trigger, metric, target}.
*/}}
{{- define "petals-chat.autoscalingSignals" -}}
{{- $signals := list }}
{{- range $s := list
    (dict "trigger" "session-utilization" "metric" "petals_chat_session_utilization" "target" .sessionUtilization)
    (dict "trigger" "requests-running" "metric" "petals_chat_requests_running" "target" .requestsRunning)
    (dict "trigger" "requests-waiting" "metric" "petals_chat_requests_waiting" "target" .requestsWaiting) }}
{{- if gt (float64 $s.target) 0.0 }}
{{- $signals = append $signals $s }}
{{- end }}
{{- end }}
{{- toJson $signals }}
{{- end }}

{{/*
Scale-down behaviour of a model's autoscaler: after cooldownSeconds of low load, one replica a minute (each
removal hands its sessions to the others; scale-up is the HPA's default, fast).
*/}}
{{- define "petals-chat.scaleDownBehavior" -}}
scaleDown:
  stabilizationWindowSeconds: {{ int .cooldownSeconds }}
  policies:
    - type: Pods
      value: 1
      periodSeconds: 60
{{- end }}

{{/*
Deployment of a stateless web tier: (dict "ctx" $ "component" "gateway" "values" .Values.gateway "env" <yaml list>
"mounts" <yaml list of extra volumeMounts> "volumes" <yaml list of extra volumes>; both optional).
*/}}
{{- define "petals-chat.webDeployment" -}}
{{- $ctx := .ctx }}
{{- $v := .values }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "petals-chat.fullname" $ctx }}-{{ .component }}
  namespace: {{ $ctx.Release.Namespace }}
  labels:
    {{- include "petals-chat.componentLabels" (dict "ctx" $ctx "component" .component) | nindent 4 }}
spec:
  {{- if not $v.autoscaling.enabled }}
  replicas: {{ $v.replicas }}
  {{- end }}
  selector:
    matchLabels:
      {{- include "petals-chat.componentSelectorLabels" (dict "ctx" $ctx "component" .component) | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "petals-chat.componentLabels" (dict "ctx" $ctx "component" .component) | nindent 8 }}
      {{- with $ctx.Values.podAnnotations }}
      annotations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    spec:
      serviceAccountName: {{ include "petals-chat.serviceAccountName" $ctx }}
      automountServiceAccountToken: false
      {{- with $ctx.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- include "petals-chat.podSecurityContext" $ctx | nindent 8 }}
      terminationGracePeriodSeconds: 75
      {{- with $v.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        - name: {{ .component }}
          image: {{ include "petals-chat.image" (dict "ctx" $ctx "name" (printf "petals-chat-%s" .component)) }}
          imagePullPolicy: {{ $ctx.Values.image.pullPolicy }}
          ports:
            - name: http
              containerPort: 8080
              protocol: TCP
          env:
            - name: BIND
              value: "0.0.0.0:8080"
            - name: PROMETHEUS_MULTIPROC_DIR
              value: /tmp/metrics
            {{- .env | nindent 12 }}
            {{- with $v.extraEnv }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          {{- include "petals-chat.webProbes" $ctx | nindent 10 }}
          resources:
            {{- toYaml $v.resources | nindent 12 }}
          securityContext:
            {{- include "petals-chat.containerSecurityContext" $ctx | nindent 12 }}
          volumeMounts:
            - name: tmp
              mountPath: /tmp
            # prometheus-client's multiprocess files (PROMETHEUS_MULTIPROC_DIR): the directory must exist.
            - name: metrics
              mountPath: /tmp/metrics
            {{- with .mounts }}
            {{- . | nindent 12 }}
            {{- end }}
      volumes:
        - name: tmp
          emptyDir:
            sizeLimit: 256Mi
        - name: metrics
          emptyDir:
            sizeLimit: 64Mi
        {{- with .volumes }}
        {{- . | nindent 8 }}
        {{- end }}
{{- end }}

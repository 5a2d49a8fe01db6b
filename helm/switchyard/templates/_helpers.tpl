{{/*
Names, labels and the pieces every pod template shares. Components: coordinator, etcd, expert-worker,
attention-worker, api (the client Service), test.
*/}}

{{- define "switchyard.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* `<release>-<chart>`, or the release alone when it already contains the chart name; at most 35 characters: a
StatefulSet's name is at most 52 (its pods' controller-revision-hash label adds 11 to 63), and the longest suffix
is `-attention-worker` (17). */}}
{{- define "switchyard.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 35 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 35 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 35 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "switchyard.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The labels a component's pods are selected by: name, instance, component. Call with (dict "root" $ "component" "x"). */}}
{{- define "switchyard.selectorLabels" -}}
app.kubernetes.io/name: {{ include "switchyard.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Every object's labels: the standard app.kubernetes.io set. Call with (dict "root" $ "component" "x"). */}}
{{- define "switchyard.labels" -}}
{{ include "switchyard.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: switchyard
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ include "switchyard.chart" .root }}
{{- end -}}

{{/* The labels all pods of this release share: what the NetworkPolicy admits. */}}
{{- define "switchyard.releaseSelector" -}}
app.kubernetes.io/name: {{ include "switchyard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* repository:tag, the tag defaulting to the appVersion, with `-cuda` for the CUDA variant. */}}
{{- define "switchyard.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag | toString -}}
{{- if eq (default "cpu" .Values.image.variant) "cuda" -}}
{{- $tag = printf "%s-cuda" $tag -}}
{{- end -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}

{{- define "switchyard.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "switchyard.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The workers' membership lease: cluster.leaseTtlMs, else the coordinator's. */}}
{{- define "switchyard.workerLeaseTtlMs" -}}
{{- $lease := .Values.cluster.leaseTtlMs -}}
{{- if kindIs "invalid" $lease -}}
{{- $lease = .Values.coordinator.leaseTtlMs -}}
{{- end -}}
{{- int64 $lease -}}
{{- end -}}

{{- define "switchyard.clusterName" -}}
{{- default (include "switchyard.fullname" .) .Values.cluster.name -}}
{{- end -}}

{{/* Object names of the components and their Services. */}}
{{- define "switchyard.coordinator.name" -}}{{ include "switchyard.fullname" . }}-coordinator{{- end -}}
{{- define "switchyard.etcd.name" -}}{{ include "switchyard.fullname" . }}-etcd{{- end -}}
{{- define "switchyard.etcd.headless" -}}{{ include "switchyard.fullname" . }}-etcd-peers{{- end -}}
{{- define "switchyard.expertWorker.name" -}}{{ include "switchyard.fullname" . }}-expert-worker{{- end -}}
{{- define "switchyard.attentionWorker.name" -}}{{ include "switchyard.fullname" . }}-attention-worker{{- end -}}

{{/* `<service>.<namespace>.svc.<domain>`: the suffix of a pod's DNS name under a headless Service. */}}
{{- define "switchyard.svcDomain" -}}
{{- printf "%s.svc.%s" .root.Release.Namespace .root.Values.clusterDomain -}}
{{- end -}}

{{/* The cluster store URL every process gets as --store: etcd://HOST:PORT[,HOST:PORT...]. */}}
{{- define "switchyard.storeUrl" -}}
{{- if .Values.etcd.bundled -}}
{{- $members := list -}}
{{- $peers := include "switchyard.etcd.headless" . -}}
{{- $domain := include "switchyard.svcDomain" (dict "root" .) -}}
{{- range $i := until (int .Values.etcd.replicas) -}}
{{- $members = append $members (printf "%s-%d.%s.%s:%d" (include "switchyard.etcd.name" $) $i $peers $domain (int $.Values.etcd.clientPort)) -}}
{{- end -}}
etcd://{{ join "," $members }}
{{- else -}}
{{- if not .Values.etcd.externalEndpoints -}}
{{- fail "etcd.bundled is false: set etcd.externalEndpoints to the external etcd's members (host:port)" -}}
{{- end -}}
etcd://{{ join "," .Values.etcd.externalEndpoints }}
{{- end -}}
{{- end -}}

{{/* `--flag=value` for each [key, flag] pair whose key is set (not null) in values, as a YAML list; whole numbers print
as integers. Call with (dict "values" v "flags" (list (list "maxBatch" "max-batch") ...)); use with fromYamlArray. */}}
{{- define "switchyard.optionalArgs" -}}
{{- $args := list -}}
{{- range $pair := .flags -}}
{{- $key := index $pair 0 -}}
{{- if and (hasKey $.values $key) (not (kindIs "invalid" (index $.values $key))) -}}
{{- $value := index $.values $key -}}
{{- if and (kindIs "float64" $value) (eq (float64 (int64 $value)) $value) -}}
{{- $value = int64 $value -}}
{{- end -}}
{{- $args = append $args (printf "--%s=%v" (index $pair 1) $value) -}}
{{- end -}}
{{- end -}}
{{- toYaml $args -}}
{{- end -}}

{{/* Pod annotations: the ConfigMap's checksum (a changed setting rolls the pods), the model's name, the role's own. */}}
{{- define "switchyard.podAnnotations" -}}
checksum/config: {{ include (print .root.Template.BasePath "/configmap.yaml") .root | sha256sum }}
{{- with .root.Values.model.name }}
switchyard.dev/model: {{ . | quote }}
{{- end }}
{{- with .values.podAnnotations }}
{{ toYaml . }}
{{- end -}}
{{- end -}}

{{/* The affinity of a role: its own affinity plus pod anti-affinity against its siblings per spreadAcrossNodes.
Call with (dict "root" $ "values" .Values.x "component" "y"). */}}
{{- define "switchyard.affinity" -}}
{{- $affinity := deepCopy (default (dict) .values.affinity) -}}
{{- $mode := default "none" .values.spreadAcrossNodes -}}
{{- if ne $mode "none" -}}
{{- if hasKey $affinity "podAntiAffinity" -}}
{{- fail (printf "%s: affinity.podAntiAffinity is given and spreadAcrossNodes is %s: set spreadAcrossNodes to none to use your own" .component $mode) -}}
{{- end -}}
{{- $term := dict "topologyKey" (default "kubernetes.io/hostname" .values.topologyKey) "labelSelector" (dict "matchLabels" (include "switchyard.selectorLabels" (dict "root" .root "component" .component) | fromYaml)) -}}
{{- if eq $mode "required" -}}
{{- $_ := set $affinity "podAntiAffinity" (dict "requiredDuringSchedulingIgnoredDuringExecution" (list $term)) -}}
{{- else -}}
{{- $_ := set $affinity "podAntiAffinity" (dict "preferredDuringSchedulingIgnoredDuringExecution" (list (dict "weight" 100 "podAffinityTerm" $term))) -}}
{{- end -}}
{{- end -}}
{{- if $affinity }}
affinity:
{{ toYaml $affinity | indent 2 }}
{{- end -}}
{{- end -}}

{{/* nodeSelector, tolerations, affinity, topology spread and priority of a role's pods. Same arguments as affinity. */}}
{{- define "switchyard.scheduling" -}}
{{- with .values.nodeSelector }}
nodeSelector:
{{ toYaml . | indent 2 }}
{{- end }}
{{- with .values.tolerations }}
tolerations:
{{ toYaml . | indent 2 }}
{{- end }}
{{- include "switchyard.affinity" . }}
{{- with .values.topologySpreadConstraints }}
topologySpreadConstraints:
{{ toYaml . | indent 2 }}
{{- end }}
{{- with .values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- end -}}

{{/* The environment every switchyard container shares: its pod's name and node, the ConfigMap; then the role's own
(env) and the user's (values.extraEnv). Call with (dict "root" $ "values" .Values.x ["env" (list ...)]). */}}
{{- define "switchyard.env" -}}
env:
  - name: POD_NAME
    valueFrom:
      fieldRef:
        fieldPath: metadata.name
  - name: SWITCHYARD_NODE
    valueFrom:
      fieldRef:
        fieldPath: spec.nodeName
{{- with concat (default (list) .env) (default (list) .values.extraEnv) }}
{{ toYaml . | indent 2 }}
{{- end }}
envFrom:
  - configMapRef:
      name: {{ include "switchyard.fullname" .root }}
{{- end -}}

{{/* `--model=DIR` unless the built-in model is used, as a YAML list (use with fromYamlArray). */}}
{{- define "switchyard.modelArgs" -}}
{{- if ne .Values.model.source "builtin" -}}
{{- toYaml (list (printf "--model=%s" .Values.model.path)) -}}
{{- else -}}
[]
{{- end -}}
{{- end -}}

{{/* The container security context: the chart's, with IPC_LOCK for RDMA when asked (workers). */}}
{{- define "switchyard.securityContext" -}}
{{- $context := deepCopy .root.Values.securityContext -}}
{{- if and .rdma .root.Values.nccl.rdma.enabled -}}
{{- $capabilities := default (dict) $context.capabilities -}}
{{- $_ := set $capabilities "add" (concat (default (list) $capabilities.add) (list "IPC_LOCK") | uniq) -}}
{{- $_ := set $context "capabilities" $capabilities -}}
{{- end -}}
{{- with $context }}
securityContext:
{{ toYaml . | indent 2 }}
{{- end -}}
{{- end -}}

{{/* Volumes every switchyard pod has: the cache (built-in model) and /tmp, plus the model volume. */}}
{{- define "switchyard.volumes" -}}
- name: cache
  emptyDir: {}
- name: tmp
  emptyDir: {}
{{- $model := .Values.model }}
{{- if eq $model.source "pvc" }}
- name: model
  persistentVolumeClaim:
    claimName: {{ $model.pvc.claimName }}
    readOnly: true
{{- else if eq $model.source "hostPath" }}
- name: model
  hostPath:
    path: {{ $model.hostPath.path }}
    type: {{ $model.hostPath.type }}
{{- else if eq $model.source "initContainer" }}
- name: model
{{- if $model.initContainer.volume.claimName }}
  persistentVolumeClaim:
    claimName: {{ $model.initContainer.volume.claimName }}
{{- else }}
  emptyDir:
    sizeLimit: {{ $model.initContainer.volume.sizeLimit }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Where the model volume is mounted: model.mountPath, or model.path itself when mountPath is empty (the volume's
root is then the checkpoint directory). */}}
{{- define "switchyard.modelMountPath" -}}
{{- $model := .Values.model -}}
{{- $mount := default $model.path $model.mountPath | trimSuffix "/" -}}
{{- if not (or (eq $model.path $mount) (hasPrefix (printf "%s/" $mount) $model.path)) -}}
{{- fail (printf "model.path %s is not under model.mountPath %s: the checkpoint must be on the model volume" $model.path $mount) -}}
{{- end -}}
{{- $mount -}}
{{- end -}}

{{/* Mounts matching switchyard.volumes. */}}
{{- define "switchyard.volumeMounts" -}}
- name: cache
  mountPath: /var/cache/switchyard
- name: tmp
  mountPath: /tmp
{{- $model := .Values.model }}
{{- if ne $model.source "builtin" }}
- name: model
  mountPath: {{ include "switchyard.modelMountPath" $ }}
  readOnly: true
{{- if and (eq $model.source "pvc") $model.pvc.subPath }}
  subPath: {{ $model.pvc.subPath }}
{{- end }}
{{- end }}
{{- end -}}

{{/* The init container that fetches the checkpoint into model.path (model.source=initContainer): by default a
Hugging Face Hub download of model.initContainer.repo; model.initContainer.command replaces it. */}}
{{- define "switchyard.initContainers" -}}
{{- $model := .Values.model -}}
{{- if eq $model.source "initContainer" }}
initContainers:
  - name: fetch-model
    image: {{ default "python:3.11-slim" $model.initContainer.image | quote }}
    imagePullPolicy: {{ $model.initContainer.imagePullPolicy }}
    {{- if $model.initContainer.command }}
    command:
{{ toYaml $model.initContainer.command | indent 6 }}
    {{- else }}
    command:
      - sh
      - -c
      - |
        set -eu
        pip install --quiet --no-cache-dir --target /tmp/hf "$HF_PACKAGE"
        PYTHONPATH=/tmp/hf python - <<'EOF'
        import json, os
        from huggingface_hub import snapshot_download
        patterns = json.loads(os.environ["HF_ALLOW_PATTERNS"]) or None
        snapshot_download(repo_id=os.environ["HF_REPO"], revision=os.environ["HF_REVISION"],
                          local_dir=os.environ["MODEL_DIR"], allow_patterns=patterns)
        EOF
    {{- end }}
    env:
      - name: HOME
        value: /tmp
      - name: HF_HOME
        value: /tmp/hf-home
      - name: HF_PACKAGE
        value: {{ $model.initContainer.package | quote }}
      - name: HF_REPO
        value: {{ $model.initContainer.repo | quote }}
      - name: HF_REVISION
        value: {{ $model.initContainer.revision | toString | quote }}
      - name: HF_ALLOW_PATTERNS
        value: {{ $model.initContainer.allowPatterns | toJson | quote }}
      - name: MODEL_DIR
        value: {{ $model.path | quote }}
      {{- if $model.initContainer.tokenSecret.name }}
      - name: HF_TOKEN
        valueFrom:
          secretKeyRef:
            name: {{ $model.initContainer.tokenSecret.name }}
            key: {{ $model.initContainer.tokenSecret.key }}
      {{- end }}
    {{- with $model.initContainer.resources }}
    resources:
{{ toYaml . | indent 6 }}
    {{- end }}
    securityContext:
      allowPrivilegeEscalation: false
      capabilities:
        drop: ["ALL"]
    volumeMounts:
      - name: model
        mountPath: {{ include "switchyard.modelMountPath" $ }}
      - name: tmp
        mountPath: /tmp
{{- end }}
{{- end -}}

{{/* Native gRPC probes on grpc.health.v1. Startup covers the load (the port is bound early but answers only once
the process serves); liveness asks the whole server (""), readiness the role's service, which turns NOT_SERVING when
shutdown starts. Call with (dict "probes" .Values.x.probes "port" "grpc" "service" "switchyard.v1.Y"). */}}
{{- define "switchyard.grpcProbes" -}}
startupProbe:
  grpc:
    port: {{ .port }}
    service: {{ .service | quote }}
  periodSeconds: {{ .probes.periodSeconds }}
  timeoutSeconds: {{ .probes.timeoutSeconds }}
  failureThreshold: {{ .probes.startupFailureThreshold }}
livenessProbe:
  grpc:
    port: {{ .port }}
    service: ""
  periodSeconds: {{ .probes.periodSeconds }}
  timeoutSeconds: {{ .probes.timeoutSeconds }}
  failureThreshold: {{ .probes.livenessFailureThreshold }}
readinessProbe:
  grpc:
    port: {{ .port }}
    service: {{ .service | quote }}
  periodSeconds: {{ .probes.periodSeconds }}
  timeoutSeconds: {{ .probes.timeoutSeconds }}
  failureThreshold: {{ .probes.readinessFailureThreshold }}
{{- end -}}

{{/* The device flag of a worker with GPUs: it computes on the first of its pod's GPUs (`--device=cuda:0`; the device
plugin makes the pod's GPUs cuda:0..). GPUs need the CUDA image: the CPU build would refuse the flag at start. */}}
{{- define "switchyard.deviceArgs" -}}
{{- $args := list -}}
{{- if gt (int .values.gpus) 0 -}}
{{- if ne .root.Values.image.variant "cuda" -}}
{{- fail (printf "%s.gpus is %d but image.variant is %s: GPU workers need the CUDA build (image.variant: cuda)" .component (int .values.gpus) .root.Values.image.variant) -}}
{{- end -}}
{{- $args = append $args "--device=cuda:0" -}}
{{- end -}}
{{- toYaml $args -}}
{{- end -}}

{{/* Resources of a worker: its own plus GPUs and RDMA devices, as requests and limits alike (extended resources
cannot be overcommitted: the two must be equal). */}}
{{- define "switchyard.workerResources" -}}
{{- $resources := deepCopy (default (dict) .values.resources) -}}
{{- $devices := dict -}}
{{- if gt (int .values.gpus) 0 -}}
{{- $_ := set $devices .root.Values.gpu.resourceName (int .values.gpus) -}}
{{- end -}}
{{- if .root.Values.nccl.rdma.enabled -}}
{{- range $name, $count := .root.Values.nccl.rdma.resources -}}
{{- $_ := set $devices $name $count -}}
{{- end -}}
{{- end -}}
{{- if $devices -}}
{{- $_ := set $resources "limits" (merge (deepCopy $devices) (default (dict) $resources.limits)) -}}
{{- $_ := set $resources "requests" (merge (deepCopy $devices) (default (dict) $resources.requests)) -}}
{{- end -}}
{{- with $resources }}
resources:
{{ toYaml . | indent 2 }}
{{- end -}}
{{- end -}}

{{/* hostNetwork, DNS policy and runtime class of a worker pod. */}}
{{- define "switchyard.workerPodNetwork" -}}
{{- if .root.Values.nccl.hostNetwork }}
{{- if ne .values.spreadAcrossNodes "required" -}}
{{- fail (printf "nccl.hostNetwork is true, so %s.spreadAcrossNodes must be required: two of its pods on one node's network would bind the same ports" .component) -}}
{{- end }}
hostNetwork: true
dnsPolicy: ClusterFirstWithHostNet
{{- end }}
{{- if and .root.Values.gpu.runtimeClassName (gt (int .values.gpus) 0) }}
runtimeClassName: {{ .root.Values.gpu.runtimeClassName }}
{{- end }}
{{- end -}}

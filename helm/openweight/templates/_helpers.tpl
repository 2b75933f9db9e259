{{/* Names ---------------------------------------------------------------------------------- */}}

{{- define "openweight.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "openweight.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "openweight.router.fullname" -}}
{{- printf "%s-router" (include "openweight.fullname" . | trunc 56 | trimSuffix "-") -}}
{{- end -}}

{{/* The RayService; KubeRay names its Services `<name>-serve-svc` and `<name>-head-svc` and
     prefixes RayCluster and pod names with it, so keep it short. */}}
{{- define "openweight.rayservice.name" -}}
{{- printf "%s-ray" (include "openweight.fullname" . | trunc 36 | trimSuffix "-") -}}
{{- end -}}

{{- define "openweight.config.name" -}}
{{- printf "%s-config" (include "openweight.fullname" . | trunc 56 | trimSuffix "-") -}}
{{- end -}}

{{- define "openweight.router.serviceAccountName" -}}
{{- if .Values.router.serviceAccount.create -}}
{{- default (include "openweight.router.fullname" .) .Values.router.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.router.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "openweight.modelCache.claimName" -}}
{{- default (printf "%s-model-cache" (include "openweight.fullname" . | trunc 50 | trimSuffix "-")) .Values.cluster.modelCache.existingClaim -}}
{{- end -}}

{{/* Labels --------------------------------------------------------------------------------- */}}

{{- define "openweight.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "openweight.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: openweight
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels of one component: router, ray-head or ray-worker. */}}
{{- define "openweight.selectorLabels" -}}
app.kubernetes.io/name: {{ include "openweight.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "openweight.componentLabels" -}}
{{ include "openweight.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* A pod selector matching every Ray pod (head and workers) of this release. */}}
{{- define "openweight.ray.podSelector" -}}
matchLabels:
  app.kubernetes.io/name: {{ include "openweight.name" . }}
  app.kubernetes.io/instance: {{ .Release.Name }}
matchExpressions:
  - key: app.kubernetes.io/component
    operator: In
    values: [ray-head, ray-worker]
{{- end -}}

{{/* The NetworkPolicy peer of the KubeRay operator: its pods in `namespaceSelector` when set,
     else in `namespace`, else in the release's namespace (a peer without a namespaceSelector). */}}
{{- define "openweight.kuberayOperator.peer" -}}
{{- $op := .Values.networkPolicy.kuberayOperator -}}
{{- $peer := dict "podSelector" $op.podSelector -}}
{{- if $op.namespaceSelector -}}
{{- $_ := set $peer "namespaceSelector" $op.namespaceSelector -}}
{{- else if $op.namespace -}}
{{- $_ := set $peer "namespaceSelector" (dict "matchLabels" (dict "kubernetes.io/metadata.name" $op.namespace)) -}}
{{- end -}}
{{- toYaml $peer -}}
{{- end -}}

{{/* Images ---------------------------------------------------------------------------------- */}}

{{- define "openweight.router.image" -}}
{{- printf "%s:%s" .Values.router.image.repository (default .Chart.AppVersion .Values.router.image.tag) -}}
{{- end -}}

{{- define "openweight.cluster.image" -}}
{{- printf "%s:%s" .Values.cluster.image.repository (default .Chart.AppVersion .Values.cluster.image.tag) -}}
{{- end -}}

{{/* The config file ------------------------------------------------------------------------- */}}

{{/* The URL the router uses for the cluster: the RayService's serve Service (only pods whose
     Serve proxy is healthy) when the chart deploys it, else `cluster.url`. On the classic path the
     OpenAI ingress serves /v1 under the application's route prefix (`/` adds nothing); on the
     direct path the router derives each model's base from it, `<routePrefix>/<model slug>/v1`. */}}
{{- define "openweight.cluster.url" -}}
{{- if .Values.cluster.enabled -}}
{{- $prefix := trimSuffix "/" .Values.cluster.serve.routePrefix -}}
{{- printf "http://%s-serve-svc.%s.svc:%d%s/v1" (include "openweight.rayservice.name" .) .Release.Namespace (int .Values.cluster.serve.port) $prefix -}}
{{- else -}}
{{- .Values.cluster.url -}}
{{- end -}}
{{- end -}}

{{/* The name of the environment variable the router reads client keys from. */}}
{{- define "openweight.router.keysEnv" -}}
{{- $auth := (.Values.router.config | default dict).auth | default dict -}}
{{- default "OPENWEIGHT_API_KEYS" $auth.keys_env -}}
{{- end -}}

{{- define "openweight.router.insecureNoAuth" -}}
{{- $auth := (.Values.router.config | default dict).auth | default dict -}}
{{- if $auth.insecure_no_auth }}true{{ end -}}
{{- end -}}

{{- define "openweight.router.keysFilePath" -}}
/etc/openweight/keys/{{ .Values.router.apiKeys.keysFile.secretKey }}
{{- end -}}

{{/* The models of the config file: `models`, or `defaultModels` while `models` is empty. */}}
{{- define "openweight.models" -}}
{{- toYaml (.Values.models | default .Values.defaultModels) -}}
{{- end -}}

{{/* The whole config file as YAML: router, cluster, providers, models (router/settings.py). */}}
{{- define "openweight.config" -}}
{{- $router := deepCopy (.Values.router.config | default dict) -}}
{{- $_ := set $router "host" "0.0.0.0" -}}
{{- $_ := set $router "port" 8000 -}}
{{- if .Values.router.apiKeys.keysFile.existingSecret -}}
{{- $auth := deepCopy ($router.auth | default dict) -}}
{{- $_ := set $auth "keys_file" (include "openweight.router.keysFilePath" .) -}}
{{- $_ := set $router "auth" $auth -}}
{{- end -}}
{{- $cluster := deepCopy (.Values.cluster.config | default dict) -}}
{{- if or (hasKey $cluster "url") (hasKey $cluster "enabled") -}}
{{- fail "cluster.config.url / cluster.config.enabled: set cluster.url and cluster.enabled instead" -}}
{{- end -}}
{{- $url := include "openweight.cluster.url" . -}}
{{- if $url -}}
{{- $_ := set $cluster "url" $url -}}
{{- else -}}
{{- $_ := set $cluster "enabled" false -}}
{{- end -}}
{{- $config := dict "router" $router "cluster" $cluster "providers" (.Values.providers | default dict) "models" (include "openweight.models" . | fromYaml) -}}
{{- toYaml $config -}}
{{- end -}}

{{/* The Ray Serve config (serveConfigV2): the `serve` block of every hosted model, keyed by the
     model id the cluster serves (`cluster_model`, else the public name). With the default
     `cluster.serve` values it is what `openweight cluster serve-config` writes for the same config
     (cluster/builder.py serve_config, which always writes application `openweight`, route prefix
     `/` and import path `cluster.builder:app_from_args`, then the capacity application). */}}
{{- define "openweight.serveConfig" -}}
{{- $blocks := dict -}}
{{- range $name, $model := (include "openweight.models" . | fromYaml) -}}
{{- if $model.serve -}}
{{- $_ := set $blocks (default $name $model.cluster_model) $model.serve -}}
{{- end -}}
{{- end -}}
{{- if not $blocks -}}
{{- fail "models: no model has a `serve` block, so the cluster has nothing to host (cluster.enabled=false serves from providers only)" -}}
{{- end -}}
{{- $serve := .Values.cluster.serve -}}
{{- $apps := list -}}
{{- if eq (include "openweight.cluster.dataPath" .) "direct" -}}
{{- $prefix := trimSuffix "/" $serve.routePrefix -}}
{{- range $id, $block := $blocks -}}
{{- $slug := include "openweight.cluster.slug" $id -}}
{{- $args := dict "models" (dict $id $block) "data_path" "direct" -}}
{{- $env := dict "env_vars" (dict "RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING" "1") -}}
{{- $apps = append $apps (dict "name" $slug "route_prefix" (printf "%s/%s" $prefix $slug) "import_path" $serve.importPath "args" $args "runtime_env" $env) -}}
{{- end -}}
{{- else -}}
{{- $apps = list (dict "name" $serve.applicationName "route_prefix" $serve.routePrefix "import_path" $serve.importPath "args" (dict "models" $blocks)) -}}
{{- end -}}
{{- /* The capacity application (cluster/capacity.py): replicas per model for the router, on the Serve port. */ -}}
{{- $capacityPath := "/openweight/capacity" -}}
{{- with .Values.cluster.config -}}{{- with .capacity -}}{{- with .path -}}{{- $capacityPath = . -}}{{- end -}}{{- end -}}{{- end -}}
{{- $capacity := dict "name" "openweight-capacity" "route_prefix" $capacityPath "import_path" "cluster.capacity:app_from_args" "args" (dict "models" (keys $blocks | sortAlpha)) -}}
{{- $config := dict "proxy_location" "EveryNode" "http_options" (dict "host" "0.0.0.0" "port" (int $serve.port)) "applications" (append $apps $capacity) -}}
{{- toYaml $config -}}
{{- end -}}

{{/* The cluster's data path (`cluster.config.data_path`, router/settings.py): `direct` (default)
     or `classic`. */}}
{{- define "openweight.cluster.dataPath" -}}
{{- default "direct" (.Values.cluster.config | default dict).data_path -}}
{{- end -}}

{{/* A model id's route name on the direct path, as router/cluster_routes.py `slug` writes it:
     lower case, every run of characters other than a-z and 0-9 as one `-`, no `-` at either end. */}}
{{- define "openweight.cluster.slug" -}}
{{- $slug := regexReplaceAll "[^a-z0-9]+" (lower (toString .)) "-" | trimAll "-" -}}
{{- if not $slug -}}
{{- fail (printf "models: model id %q has no letter or digit to name its route with" (toString .)) -}}
{{- end -}}
{{- $slug -}}
{{- end -}}

{{/* Checks that stop a bad install at render time. */}}
{{- define "openweight.validate" -}}
{{- if not (include "openweight.models" . | fromYaml) -}}
{{- fail "models: at least one model is required" -}}
{{- end -}}
{{- if and (not .Values.cluster.enabled) (not .Values.cluster.url) -}}
{{- range $name, $model := (include "openweight.models" . | fromYaml) -}}
{{- if ne (default "self_hosted_first" $model.policy) "provider_only" -}}
{{- fail (printf "models.%s.policy: %s needs a cluster: set cluster.enabled=true or cluster.url, or use provider_only" $name (default "self_hosted_first" $model.policy)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- range $name, $provider := .Values.providers -}}
{{- if hasKey $provider "api_key" -}}
{{- fail (printf "providers.%s.api_key: keys are never values; set api_key_env and put the key in a Secret" $name) -}}
{{- end -}}
{{- range $header, $_ := ($provider.headers | default dict) -}}
{{- if regexMatch "(?i)(auth|key|token|secret|cookie)" $header -}}
{{- fail (printf "providers.%s.headers.%s: credentials are never values (the config file is a ConfigMap); use api_key_env" $name $header) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- range $name, $model := (include "openweight.models" . | fromYaml) -}}
{{- with $model.serve -}}
{{- include "openweight.validate.noCredentialKeys" (dict "where" (printf "models.%s.serve.env" $name) "map" .env) -}}
{{- include "openweight.validate.noCredentialKeys" (dict "where" (printf "models.%s.serve.engine_args" $name) "map" .engine_args) -}}
{{- end -}}
{{- end -}}
{{- if .Values.cluster.enabled -}}
{{- include "openweight.validate.replicasFit" . -}}
{{- end -}}
{{- include "openweight.validate.sharedState" . -}}
{{- end -}}

{{/* Limits counted per key or provider need one count for all router replicas: with several
     replicas (or the HPA) and rate limits or budgets, refuse to render without shared state. */}}
{{- define "openweight.validate.sharedState" -}}
{{- $state := (.Values.router.config | default dict).state | default dict -}}
{{- if hasKey $state "redis_url" -}}
{{- fail "router.config.state.redis_url: the Redis URL may hold a password; put it in a Secret and name it in router.state.redisUrl.existingSecret" -}}
{{- end -}}
{{- $limited := list -}}
{{- $keys := .Values.router.state.keysHaveLimits -}}
{{- if or (eq (toString $keys) "true") (and (kindIs "invalid" $keys) .Values.router.apiKeys.keysFile.existingSecret) -}}
{{- $limited = append $limited "client keys (the keys file) with rate_limit or budget" -}}
{{- end -}}
{{- range $name, $provider := .Values.providers -}}
{{- if $provider.budget -}}
{{- $limited = append $limited (printf "providers.%s.budget" $name) -}}
{{- end -}}
{{- end -}}
{{- $replicas := ternary "the HPA" (printf "%d replicas" (int .Values.router.replicas)) .Values.router.autoscaling.enabled -}}
{{- $several := or .Values.router.autoscaling.enabled (gt (int .Values.router.replicas) 1) -}}
{{- if and $several $limited (not .Values.router.state.redisUrl.existingSecret) -}}
{{- fail (printf "router.state.redisUrl.existingSecret: the router runs %s and counts %s per replica, letting each through once per replica; point the routers at one Redis (see the chart README), run one replica, or set router.state.keysHaveLimits=false when the keys file has no rate_limit or budget" $replicas (join " and " $limited)) -}}
{{- end -}}
{{- end -}}

{{/* Non-empty when a key name reads as a credential: one of its parts (split at `_`, `-`, `.` and
     camelCase humps) is a credential word. HF_TOKEN, api-key and apiKey match; tokenizer,
     tokenizer_mode and max_num_batched_tokens do not. */}}
{{- define "openweight.isCredentialName" -}}
{{- $words := list "token" "secret" "password" "passwd" "key" "apikey" "credential" "credentials" "auth" "cookie" -}}
{{- $name := regexReplaceAll "([a-z0-9])([A-Z])" (toString .) "${1}_${2}" | lower -}}
{{- range regexSplit "[-_.]+" $name -1 -}}
{{- if has . $words }}true{{ end -}}
{{- end -}}
{{- end -}}

{{/* Fails on a credential-like key in `.map` (a `serve` block's env or engine_args, nested maps
     included): serve blocks are written in plain text into the router's ConfigMap and the
     RayService's serveConfigV2. A boolean passes (vLLM's `hf_token: true` names no token). */}}
{{- define "openweight.validate.noCredentialKeys" -}}
{{- $where := .where -}}
{{- if kindIs "map" .map -}}
{{- range $key, $value := .map -}}
{{- if and (include "openweight.isCredentialName" $key) (not (kindIs "bool" $value)) -}}
{{- fail (printf "%s.%s: credentials are never values (serve blocks are written into the ConfigMap and the RayService spec); give a Hugging Face token with cluster.hfToken.existingSecret (env HF_TOKEN on every Ray pod), any other secret as a cluster.env entry with valueFrom.secretKeyRef" $where $key) -}}
{{- end -}}
{{- include "openweight.validate.noCredentialKeys" (dict "where" (printf "%s.%s" $where $key) "map" $value) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Fails when a GPU model's replica cannot be placed on the worker groups (cluster/placement.py):
     with pipeline_parallel_size 1 all tensor_parallel_size GPUs of a replica go on one node
     (STRICT_PACK), so some group needs `gpus` >= TP; with PP > 1 the TP x PP bundles may span nodes
     (PACK), so the groups together (`gpus` x `maxReplicas`) need TP x PP. */}}
{{- define "openweight.validate.replicasFit" -}}
{{- $largest := 0 -}}
{{- $total := 0 -}}
{{- range .Values.cluster.workerGroups -}}
{{- if gt (int .maxReplicas) 0 -}}
{{- $largest = max $largest (int .gpus) -}}
{{- $total = add $total (mul (int .gpus) (int .maxReplicas)) -}}
{{- end -}}
{{- end -}}
{{- range $name, $model := (include "openweight.models" . | fromYaml) -}}
{{- $serve := $model.serve -}}
{{- if and $serve (ne (lower (toString (default "gpu" $serve.accelerator))) "cpu") -}}
{{- $tp := int (default 1 $serve.tensor_parallel_size) -}}
{{- $pp := int (default 1 $serve.pipeline_parallel_size) -}}
{{- if and (eq $pp 1) (gt $tp $largest) -}}
{{- fail (printf "models.%s.serve.tensor_parallel_size: one replica needs %d GPUs on one node (Ray packs its tensor-parallel workers on one node), but the largest cluster.workerGroups pod has %d; add a worker group with gpus: %d" $name $tp $largest $tp) -}}
{{- end -}}
{{- if and (gt $pp 1) (gt (mul $tp $pp) $total) -}}
{{- fail (printf "models.%s.serve: one replica needs tensor_parallel_size x pipeline_parallel_size = %d GPUs, but cluster.workerGroups offer %d in all (gpus x maxReplicas)" $name (mul $tp $pp) $total) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

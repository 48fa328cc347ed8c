{{/* Names and labels shared by every template of the chart. */}}

{{- define "moeshard.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "moeshard.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "moeshard.operatorName" -}}
{{- printf "%s-operator" (include "moeshard.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "moeshard.selectorLabels" -}}
app.kubernetes.io/name: {{ include "moeshard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "moeshard.labels" -}}
{{ include "moeshard.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "moeshard.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "moeshard.operatorName" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "moeshard.image" -}}
{{- printf "%s:%s" .Values.operator.image.repository (default .Chart.AppVersion .Values.operator.image.tag) -}}
{{- end -}}

{{/* Namespaces whose MoEDeployments the operator reconciles (namespaced mode). */}}
{{- define "moeshard.watchNamespaces" -}}
{{- if .Values.operator.watch.namespaces -}}
{{- join "," .Values.operator.watch.namespaces -}}
{{- else -}}
{{- .Release.Namespace -}}
{{- end -}}
{{- end -}}

{{/* The rules of the operator's role: exactly the calls it makes (tests/test_operator/test_zz_rbac_matches_calls.py
compares them with the API calls the operator tests record). The operator reads children by LIST with a label
selector and writes them with create / merge-patch / delete; it never watches them and never PUTs. */}}
{{- define "moeshard.rules" -}}
- apiGroups: [moeshard.io]
  resources: [moedeployments]
  verbs: [get, list, watch, patch]
- apiGroups: [moeshard.io]
  resources: [moedeployments/status]
  verbs: [patch]
# Children carry ownerReferences with blockOwnerDeletion: the API server's OwnerReferencesPermissionEnforcement
# admission asks for update on the owner's finalizers subresource (no request is made there).
- apiGroups: [moeshard.io]
  resources: [moedeployments/finalizers]
  verbs: [update]
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, list, create, patch, delete]
- apiGroups: [""]
  resources: [services]
  verbs: [list, create, patch, delete]
- apiGroups: [""]
  resources: [pods]
  verbs: [list, patch, delete]
- apiGroups: [""]
  resources: [events]
  verbs: [create, list]
# The hf:// weights cache and its download Job: created once, never patched (operator/weights.py).
- apiGroups: [""]
  resources: [persistentvolumeclaims]
  verbs: [list, create, delete]
- apiGroups: [batch]
  resources: [jobs]
  verbs: [list, create, delete]
- apiGroups: [apps]
  resources: [statefulsets]
  verbs: [list, create, patch, delete]
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [list, create, patch, delete]
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [list, create, patch, delete]
- apiGroups: [leaderworkerset.x-k8s.io]
  resources: [leaderworkersets]
  verbs: [list, create, patch, delete]
- apiGroups: [resource.nvidia.com]
  resources: [computedomains]
  verbs: [list, create, patch, delete]
- apiGroups: [autoscaling]
  resources: [horizontalpodautoscalers]
  verbs: [list, create, patch, delete]
- apiGroups: [keda.sh]
  resources: [scaledobjects]
  verbs: [list, create, patch, delete]
- apiGroups: [kopf.dev]
  resources: [kopfpeerings]
  verbs: [list, watch, patch]
{{- end -}}

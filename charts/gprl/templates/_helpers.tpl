{{- define "gprl.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "gprl.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "gprl.name" .) .Release.Name -}}
{{- printf "%s-operator" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s-operator" .Release.Name (include "gprl.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Prefix of this release's cluster-scoped objects (admission policies, the small ClusterRole): Helm release
names are unique per namespace only, so two releases (e.g. one per team namespace, with watchNamespaces) get
distinct names only with the namespace in them. */}}
{{- define "gprl.clusterName" -}}
{{- printf "%s-%s" (include "gprl.fullname" .) .Release.Namespace | trunc 230 | trimSuffix "-" -}}
{{- end -}}

{{- define "gprl.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "gprl.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: gprl
{{- end -}}

{{- define "gprl.selectorLabels" -}}
app.kubernetes.io/name: {{ include "gprl.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "gprl.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "gprl.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Rules on namespaced resources: what the operator needs to run GPRLRuns (granted cluster-wide or per namespace). */}}
{{- define "gprl.namespacedRules" -}}
# the runs: watch, kopf's bookkeeping annotations, status
- apiGroups: ["gprl.dev"]
  resources: ["gprlruns"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["gprl.dev"]
  resources: ["gprlruns/status"]
  verbs: ["get", "patch"]
# owner references with blockOwnerDeletion (OwnerReferencesPermissionEnforcement)
- apiGroups: ["gprl.dev"]
  resources: ["gprlruns/finalizers"]
  verbs: ["update"]
# children: created (POST, never adopting an existing name), updated by server-side apply only when the run
# controls them, watched (by the operator's label) to repair them; deleted by the garbage collector through
# owner references, never by the operator (no delete verb). Secrets are not among them: the operator reads none.
- apiGroups: [""]
  resources: ["configmaps", "services", "serviceaccounts", "persistentvolumeclaims"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles", "rolebindings"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: ["apps"]
  resources: ["deployments", "statefulsets"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch"]
# each run's server token: created once, read back by name (no list: the operator sees no other Secret)
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "create"]
# each run's NetworkPolicy (only its own pods reach its servers and rendezvous port)
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "list", "watch", "create", "patch"]
# pod failures of the runs' Jobs show in the runs' conditions
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
# warnings and errors of the handlers as Events
- apiGroups: ["", "events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end -}}

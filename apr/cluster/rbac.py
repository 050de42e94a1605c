"""The Role and RoleBinding that let the pipeline's ServiceAccount run Jobs and Trainer
TrainJobs (`apr pipeline rbac`)."""

from __future__ import annotations


def rbac_manifests(namespace: str, service_account: str = "pipeline-runner") -> list[dict]:
    """A Role and RoleBinding letting the pipeline's ServiceAccount (in `namespace`) launch Jobs."""
    name = "apr-job-launcher"
    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": "apr"}
    metadata = {"name": name, "namespace": namespace, "labels": labels}
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": metadata,
        "rules": [
            {"apiGroups": ["batch"], "resources": ["jobs"],
             "verbs": ["create", "get", "list", "watch", "delete"]},
            {"apiGroups": ["trainer.kubeflow.org"], "resources": ["trainjobs"],  # SFT, nodes > 1
             "verbs": ["create", "get", "list", "watch", "delete"]},
            {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
            {"apiGroups": [""], "resources": ["events"], "verbs": ["list"]},  # why no pod came
        ],
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": dict(metadata),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": service_account, "namespace": namespace}],
    }
    return [role, binding]

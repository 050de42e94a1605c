"""The GRPO Job manifest: valid against Kubernetes' schemas, SGLang as a native sidecar."""

from __future__ import annotations

import kubernetes_validate
import pytest

from apr.cluster.grpo_job import GRPOJobSpec, grpo_job


@pytest.fixture
def job() -> dict:
    return grpo_job(GRPOJobSpec(name="grpo-run-1", model_uri="s3://apr-models/models/apr/v1"))


@pytest.mark.parametrize("version", ["1.29.0", "1.31.0"])
def test_the_job_validates_against_kubernetes_schemas(job, version):
    kubernetes_validate.validate(job, version, strict=True)


def test_sglang_is_a_native_sidecar_after_the_model_pull(job):
    pod = job["spec"]["template"]["spec"]
    pull, sidecar = pod["initContainers"]
    assert pull["name"] == "pull-model" and "restartPolicy" not in pull
    assert sidecar["name"] == "sglang" and sidecar["restartPolicy"] == "Always"
    assert "--enable-metrics" in sidecar["command"] and "--allow-auto-truncate" in sidecar["command"]
    assert pod["restartPolicy"] == "Never" and job["spec"]["backoffLimit"] == 0


def test_the_probes_reach_sglang_where_it_listens(job):
    """kubelet's httpGet probes dial the pod IP: SGLang on loopback needs a probe from inside."""
    sidecar = job["spec"]["template"]["spec"]["initContainers"][1]
    command = sidecar["command"]
    host, port = command[command.index("--host") + 1], command[command.index("--port") + 1]
    for probe in ("startupProbe", "readinessProbe"):
        check = sidecar[probe]
        if "httpGet" in check:
            assert host == "0.0.0.0" and str(check["httpGet"]["port"]) == port
        else:
            assert f"http://{host}:{port}/health_generate" in " ".join(check["exec"]["command"])
        assert check["timeoutSeconds"] >= 10  # /health_generate decodes a token, not instant


def test_both_containers_get_a_gpu_and_share_the_weights_volume(job):
    pod = job["spec"]["template"]["spec"]
    trainer, sidecar = pod["containers"][0], pod["initContainers"][1]
    for container in (trainer, sidecar):
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert {"name": "shared", "mountPath": "/shared"} in container["volumeMounts"]
    assert any(v["name"] == "dshm" and v["emptyDir"]["medium"] == "Memory" for v in pod["volumes"])
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_credentials_come_only_from_the_secret(job):
    pod = job["spec"]["template"]["spec"]
    for container in (pod["containers"][0], pod["initContainers"][0]):  # trainer, model pull
        env = container["env"]
        secret_envs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in env if "valueFrom" in e}
        assert secret_envs["AWS_ACCESS_KEY_ID"] == {"name": "mlpipeline-minio-artifact",
                                                    "key": "accesskey"}
        assert all("value" not in e for e in env if e["name"].startswith("AWS_"))
    assert pod["automountServiceAccountToken"] is False  # no container calls the API


def test_native_sidecars_need_kubernetes_1_29(job):
    """Before 1.29 an init container has no restartPolicy: the schema check must catch it."""
    with pytest.raises(kubernetes_validate.ValidationError, match="restartPolicy"):
        kubernetes_validate.validate(job, "1.27.0", strict=True)

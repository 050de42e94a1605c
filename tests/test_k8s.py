"""The GRPO Job manifest: valid against Kubernetes' schemas, SGLang as a native sidecar."""

from __future__ import annotations

import re

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


def test_sglang_runs_in_the_training_image_unless_told_otherwise(job):
    [trainer] = job["spec"]["template"]["spec"]["containers"]
    pull, sidecar = job["spec"]["template"]["spec"]["initContainers"]
    assert sidecar["image"] == trainer["image"] == pull["image"]  # one image to pull
    other = grpo_job(GRPOJobSpec(name="grpo-run-1", model_uri="s3://m/v1",
                                 sglang_image="example/sglang:1"))
    assert other["spec"]["template"]["spec"]["initContainers"][1]["image"] == "example/sglang:1"


def sglang_probe_problems(sglang: dict) -> tuple[list[str], set[str]]:
    """Why the probes of an SGLang container would not reach it, and the probe kinds it has.

    kubelet's httpGet probes dial the pod IP: they need SGLang on 0.0.0.0 and the port it
    listens on (a number, or the name of a containerPort). An exec probe runs inside the
    container: its command must call the host and port SGLang listens on. /health_generate
    decodes a token: a probe of it needs 10 s or more.
    """
    command = sglang["command"]
    host = command[command.index("--host") + 1] if "--host" in command else "127.0.0.1"
    port = command[command.index("--port") + 1] if "--port" in command else "30000"
    named = {p["name"]: str(p["containerPort"]) for p in sglang.get("ports", []) if "name" in p}
    problems, kinds = [], set()
    for name in ("startupProbe", "readinessProbe", "livenessProbe"):
        check = sglang.get(name)
        if check is None:
            continue
        if "httpGet" in check:
            kinds.add("httpGet")
            target = str(check["httpGet"]["port"])
            target = named.get(target, target)
            if host not in ("0.0.0.0", "::"):
                problems.append(f"{name}: httpGet dials the pod IP, SGLang listens on {host}")
            if target != port:
                problems.append(f"{name}: httpGet to port {target}, SGLang listens on {port}")
            generates = check["httpGet"]["path"] == "/health_generate"
        elif "exec" in check:
            kinds.add("exec")
            line = " ".join(check["exec"]["command"])
            urls = re.findall(r"https?://[^/\s'\"]+", line)
            if urls != [f"http://{host}:{port}"]:
                problems.append(f"{name}: exec calls {urls}, SGLang listens on {host}:{port}")
            generates = "/health_generate" in line
        else:
            problems.append(f"{name}: neither httpGet nor exec")
            continue
        if generates and check.get("timeoutSeconds", 1) < 10:
            problems.append(f"{name}: /health_generate within {check.get('timeoutSeconds', 1)} s")
    return problems, kinds


def test_the_probes_reach_sglang_where_it_listens(job):
    """kubelet's httpGet probes dial the pod IP: SGLang on loopback needs a probe from inside."""
    sidecar = job["spec"]["template"]["spec"]["initContainers"][1]
    assert sglang_probe_problems(sidecar) == ([], {"exec"})
    assert {"startupProbe", "readinessProbe"} <= set(sidecar)


def _http_probes(sidecar: dict, port) -> dict:
    probe = {"httpGet": {"path": "/health_generate", "port": port}, "timeoutSeconds": 30}
    return {**sidecar, "startupProbe": probe, "readinessProbe": probe,
            "ports": [{"name": "sglang", "containerPort": 30000}]}


def _listening_on(sidecar: dict, host: str) -> dict:
    command = list(sidecar["command"])
    command[command.index("--host") + 1] = host
    return {**sidecar, "command": command}


@pytest.mark.parametrize("change, expected", [
    (lambda s: _http_probes(s, 30000),
     ["startupProbe: httpGet dials the pod IP, SGLang listens on 127.0.0.1"]),
    (lambda s: _http_probes(_listening_on(s, "0.0.0.0"), 30000), []),
    (lambda s: _http_probes(_listening_on(s, "0.0.0.0"), "sglang"), []),
    (lambda s: _http_probes(_listening_on(s, "0.0.0.0"), 8000),
     ["startupProbe: httpGet to port 8000, SGLang listens on 30000"]),
    (lambda s: _listening_on(s, "0.0.0.0"),
     ["startupProbe: exec calls ['http://127.0.0.1:30000'], SGLang listens on 0.0.0.0:30000"]),
    (lambda s: {**s, "startupProbe": {**s["startupProbe"], "timeoutSeconds": 5}},
     ["startupProbe: /health_generate within 5 s"]),
], ids=["http-to-loopback", "http-to-all", "http-named-port", "http-wrong-port",
        "exec-wrong-host", "short-timeout"])
def test_the_probe_check_catches_probes_that_miss_sglang(job, change, expected):
    sidecar = change(job["spec"]["template"]["spec"]["initContainers"][1])
    problems, kinds = sglang_probe_problems(sidecar)
    assert problems[:1] == expected[:1] and bool(problems) == bool(expected)
    assert kinds == ({"httpGet"} if "httpGet" in sidecar["startupProbe"] else {"exec"})


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

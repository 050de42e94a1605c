"""The Helm chart helm/apr-server: lint, render, Kubernetes schemas, values schema, alert rules.

No cluster here, and helm-sdkpy (Helm's Go library) has lint but no `template` action: so the
chart is rendered by a real `helm install` into a loopback stand-in for the API server, which
answers discovery (reporting Kubernetes 1.29, the chart's minimum) and accepts every create.
Helm's own engine renders, checks kubeVersion and validates values against values.schema.json.
That runs in a child process (this file run as a script), because Helm's storage driver comes
from the environment that the Go runtime copies once, when the library loads.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_dashboards import SGLANG_METRICS

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "apr-server"
REQUIRE_TOOLS = os.environ.get("APR_REQUIRE_TOOLS") == "1"
NAMESPACE, RELEASE = "apr", "demo"
FULLNAME = f"{RELEASE}-apr-server"
MIN_KUBE, CRD_KINDS = "1.29.0", {"ServiceMonitor", "PrometheusRule"}
STANDARD_LABELS = ("name", "instance", "version", "component", "managed-by", "part-of")

ALL_ON = {
    "metrics": {"enabled": True, "serviceMonitor": {"enabled": True, "labels": {"release": "kps"}},
                "prometheusRule": {"enabled": True, "labels": {"release": "kps"}}},
    "dashboards": {"enabled": True, "annotations": {"grafana_folder": "APR"}},
    "server": {"auth": {"enabled": True, "existingSecret": "apr-api-token"},
               "extraArgs": ["--log-level", "debug"], "env": [{"name": "APR_X", "value": "1"}]},
    "sglang": {"extraArgs": ["--mem-fraction-static", "0.85"], "env": [{"name": "NCCL_DEBUG", "value": "WARN"}]},
    "podDisruptionBudget": {"minAvailable": "50%"},
    "serviceAccount": {"annotations": {"iam.example.com/role": "apr"}},
    "imagePullSecrets": [{"name": "regcred"}],
    "priorityClassName": "inference",
    "podAnnotations": {"example.com/a": "b"},
    "podLabels": {"team": "reasoning"},
    "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
    "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "nvidia.com/gpu.count", "operator": "Gt", "values": ["0"]}]}]}}},
    "service": {"annotations": {"example.com/s": "t"}},
    "autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 6, "inFlightPerPod": 8},
    "ingress": {"enabled": True, "className": "nginx", "annotations": {"example.com/i": "j"},
                "hosts": [{"host": "apr.example.com", "paths": [{"path": "/v1"},
                                                                {"path": "/docs", "pathType": "Exact"}]}],
                "tls": [{"secretName": "apr-tls", "hosts": ["apr.example.com"]}]},
    "networkPolicy": {"enabled": True, "from": [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]},
    "runtimeClassName": "nvidia",
    "global": {"imageRegistry": "registry.example.com"},  # an umbrella chart's
}
# Every rendering the tests look at, made in one child process: name -> values (and Kubernetes).
RENDERS = {
    "defaults": {},
    "all_on": ALL_ON,
    "metrics_only": {"metrics": {"enabled": True}},
    "features_without_master": {"metrics": {"serviceMonitor": {"enabled": True},
                                            "prometheusRule": {"enabled": True}}},
    "all_off": {"podDisruptionBudget": {"enabled": False}, "tests": {"enabled": False},
                "serviceAccount": {"create": False, "name": "shared-sa"}, "tolerations": []},
    "custom": {"sglang": {"gpu": {"resource": "nvidia.com/mig-3g.40gb", "count": 2},
                          "shm": {"sizeLimit": "16Gi"}, "livenessGenerates": True,
                          "startupProbe": {"periodSeconds": 15, "failureThreshold": 100}},
               "model": {"uri": "s3://store/models/apr-countdown/v7",
                         "s3": {"endpoint": "http://seaweedfs.kubeflow:9000",
                                "accessKey": {"secretName": "creds", "secretKey": "id"},
                                "secretKey": {"secretName": "creds", "secretKey": "key"}}},
               "server": {"maxConcurrency": 3, "requestTimeoutSeconds": 45, "maxTokens": 999},
               "dashboards": {"enabled": True, "label": "grafana.io/dashboard", "labelValue": "apr"},
               "metrics": {"enabled": True, "prometheusRule": {"enabled": True, "latencyP99Seconds": 12.5,
                                                               "errorRatio": 0.2}},
               "strategy": {"type": "RollingUpdate"}, "fullnameOverride": "apr"},
    "bad_gpu_count": {"sglang": {"gpu": {"count": "two"}}},
    "network_default": {"networkPolicy": {"enabled": True}, "model": {"servedName": "countdown-prod"}},
    "anonymous": {"model": {"s3": {"credentials": "anonymous"}}},
    "iam": {"model": {"s3": {"credentials": "iam"}},
            "serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/r"}}},
    "auth_without_secret": {"server": {"auth": {"enabled": True}}},
    "old_kubernetes": {"kube": "1.28.9"},
}
LINTS = {"defaults": {}, "all_on": ALL_ON, "bad_gpu_count": {"sglang": {"gpu": {"count": "two"}}}}
# What an install must set (`helm install` with no flags fails, naming it): every variant has it.
REQUIRED = {"model": {"uri": "s3://apr-models/models/apr-countdown/v1"},
            "image": {"apr": {"repository": "registry.example.com/apr"},
                      "serve": {"repository": "registry.example.com/apr-serve"}}}


def merged(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        out[key] = merged(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


RENDERS["run_here"] = merged(ALL_ON, {"server": {"maxTokens": 256}})  # short answers on a CPU
RENDERS = {name: merged(REQUIRED, values) for name, values in RENDERS.items()} | {
    "zero_flags": {}, "no_model": {"image": REQUIRED["image"]},
    "no_apr_image": merged(REQUIRED, {"image": {"apr": {"repository": ""}}}),
    "no_serve_image": merged(REQUIRED, {"image": {"serve": {"repository": ""}}})}
LINTS = {name: merged(REQUIRED, values) for name, values in LINTS.items()}


def need(available: bool, what: str) -> None:
    """Skip without a tool, unless APR_REQUIRE_TOOLS=1 (CI), where its absence fails."""
    if not available:
        if REQUIRE_TOOLS:
            pytest.fail(f"{what} is required (APR_REQUIRE_TOOLS=1) but absent")
        pytest.skip(f"{what} is not installed (set APR_REQUIRE_TOOLS=1 to make this a failure)")


# ---------------------------------------------------------------------------------------------
# The child process: the API server stand-in and helm-sdkpy's lint and install.


def _serve_discovery(kube_version: list[str]):
    import http.server
    import threading

    groups = {("", "v1"): [("configmaps", "ConfigMap"), ("services", "Service"), ("pods", "Pod"),
                           ("serviceaccounts", "ServiceAccount"), ("secrets", "Secret")],
              ("apps", "v1"): [("deployments", "Deployment")],
              ("policy", "v1"): [("poddisruptionbudgets", "PodDisruptionBudget")],
              ("autoscaling", "v2"): [("horizontalpodautoscalers", "HorizontalPodAutoscaler")],
              ("networking.k8s.io", "v1"): [("ingresses", "Ingress"),
                                            ("networkpolicies", "NetworkPolicy")],
              ("monitoring.coreos.com", "v1"): [("servicemonitors", "ServiceMonitor"),
                                                ("prometheusrules", "PrometheusRule")]}

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def reply(self, code, body):
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            path = self.path.split("?")[0]
            major, minor, _ = kube_version[0].split(".")
            if path == "/version":
                return self.reply(200, {"major": major, "minor": minor, "gitVersion": f"v{kube_version[0]}"})
            if path == "/api":
                return self.reply(200, {"kind": "APIVersions", "versions": ["v1"]})
            if path == "/apis":
                return self.reply(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
                    {"name": g, "versions": [{"groupVersion": f"{g}/{v}", "version": v}],
                     "preferredVersion": {"groupVersion": f"{g}/{v}", "version": v}}
                    for g, v in groups if g]})
            for (g, v), resources in groups.items():
                if path == (f"/apis/{g}/{v}" if g else f"/api/{v}"):
                    return self.reply(200, {"kind": "APIResourceList", "groupVersion": f"{g}/{v}".lstrip("/"),
                                            "resources": [{"name": n, "singularName": k.lower(), "kind": k,
                                                           "namespaced": True, "verbs": ["create", "get", "list"]}
                                                          for n, k in resources]})
            self.reply(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                             "reason": "NotFound", "code": 404})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            body["metadata"].update(uid="0", resourceVersion="1")
            self.reply(201, body)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _child(jobs: dict) -> dict:
    import asyncio
    import tempfile

    import helm_sdkpy

    kube_version = [MIN_KUBE]
    server = _serve_discovery(kube_version)
    kubeconfig = yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "s", "cluster": {"server": f"http://127.0.0.1:{server.server_address[1]}"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "s", "user": "u", "namespace": NAMESPACE}}]})
    out = {"lint": {}, "render": {}}
    chart_values = yaml.safe_load((CHART / "values.yaml").read_text())
    for name, override in jobs["lint"].items():
        with tempfile.TemporaryDirectory() as tmp:  # lint reads the chart's own values.yaml
            chart = Path(tmp) / "apr-server"
            shutil.copytree(CHART, chart)
            (chart / "values.yaml").write_text(yaml.safe_dump(merged(chart_values, override)))
            config = helm_sdkpy.Configuration(namespace=NAMESPACE, kubeconfig=kubeconfig)
            result = asyncio.run(helm_sdkpy.Lint(config).run(str(chart)))
            out["lint"][name] = [(m["Severity"], m["Path"]) for m in result["Messages"]]
    for name, values in jobs["render"].items():
        values = dict(values)
        kube_version[0] = values.pop("kube", MIN_KUBE)
        config = helm_sdkpy.Configuration(namespace=NAMESPACE, kubeconfig=kubeconfig)
        try:
            release = asyncio.run(helm_sdkpy.Install(config).run(RELEASE, str(CHART), values=values or None,
                                                               wait=False, timeout=60))
        except helm_sdkpy.HelmError as e:
            out["render"][name] = {"error": str(e)}
            continue
        out["render"][name] = {"manifest": release["manifest"], "notes": release["info"].get("notes", ""),
                               "hooks": [{"path": h["path"], "manifest": h["manifest"]}
                                         for h in release.get("hooks") or []]}
    server.shutdown()
    return out


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="session")
def helm(tmp_path_factory) -> dict:
    """Lint and render every variant once (a child process with Helm's memory storage driver)."""
    need(importlib.util.find_spec("helm_sdkpy") is not None, "helm-sdkpy")
    home = tmp_path_factory.mktemp("helm-home")
    env = {**os.environ, "HELM_DRIVER": "memory", "HOME": str(home), "KUBECONFIG": str(home / "none"),
           "HELM_CACHE_HOME": str(home / "cache"), "HELM_CONFIG_HOME": str(home / "config"),
           "HELM_DATA_HOME": str(home / "data")}
    run = subprocess.run([sys.executable, __file__], input=json.dumps({"lint": LINTS, "render": RENDERS}),
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout)


def documents(rendered: dict) -> list[tuple[str, dict]]:
    """(template path, object) for every manifest and hook of one rendering."""
    docs = []
    for chunk in re.split(r"^---\s*$", rendered["manifest"], flags=re.M):
        source = re.search(r"^# Source: (\S+)", chunk, re.M)
        obj = yaml.safe_load(chunk)
        if obj:
            docs.append((source.group(1), obj))
    docs += [(h["path"], yaml.safe_load(h["manifest"])) for h in rendered["hooks"]]
    return docs


@pytest.fixture(scope="session")
def rendered(helm):
    def get(name: str) -> list[dict]:
        result = helm["render"][name]
        assert "error" not in result, f"rendering {name} failed: {result.get('error')}"
        return [obj for _, obj in documents(result)]
    return get


def of_kind(objs: list[dict], kind: str) -> list[dict]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: list[dict], kind: str) -> dict:
    found = of_kind(objs, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def pod_spec(objs: list[dict]) -> dict:
    return one(objs, "Deployment")["spec"]["template"]["spec"]


def container(objs: list[dict], name: str) -> dict:
    spec = pod_spec(objs)
    matches = [c for c in spec["containers"] + spec.get("initContainers", []) if c["name"] == name]
    assert len(matches) == 1, name
    return matches[0]


def env_of(c: dict) -> dict:
    return {e["name"]: e for e in c.get("env", [])}


# ---------------------------------------------------------------------------------------------
# Lint and Kubernetes schemas


@pytest.mark.parametrize("variant", ["defaults", "all_on"])
def test_helm_lint_is_clean(helm, variant):
    problems = [(sev, path) for sev, path in helm["lint"][variant] if sev >= 2]  # 2 warning, 3 error
    assert not problems, f"helm lint ({variant}) reports problems at {problems}"


def test_helm_lint_rejects_a_value_that_breaks_the_schema(helm):
    assert [3, "values.yaml"] in helm["lint"]["bad_gpu_count"]


def test_schema_rejects_a_bad_value_at_install(helm):
    error = helm["render"]["bad_gpu_count"].get("error", "")
    assert "/sglang/gpu/count" in error and "want integer" in error, error


def test_an_install_with_no_flags_fails_naming_the_value_to_set(helm):
    """What has no usable default (the model, the project's unpublished images) fails the
    install with a message naming it, before any pod could fail to start."""
    error = helm["render"]["zero_flags"].get("error", "")
    assert re.search(r"(model\.uri|image\.(apr|serve)\.repository) is required", error), error
    for variant, value in (("no_model", "model.uri"), ("no_apr_image", "image.apr.repository"),
                           ("no_serve_image", "image.serve.repository")):
        error = helm["render"][variant].get("error", "")
        assert f"{value} is required" in error, (variant, error)
    assert "--set model.uri=" in helm["render"]["no_model"]["error"]


def test_auth_without_a_secret_is_refused(helm):
    assert "existingSecret" in helm["render"]["auth_without_secret"].get("error", "")


def test_chart_refuses_kubernetes_older_than_1_29(helm):
    assert "kubeVersion" in helm["render"]["old_kubernetes"].get("error", "")


@pytest.mark.parametrize("kube", [MIN_KUBE, "latest"])
@pytest.mark.parametrize("variant", ["defaults", "all_on", "all_off", "custom"])
def test_every_manifest_validates_against_kubernetes_schemas(rendered, variant, kube):
    import kubernetes_validate
    from kubernetes_validate.utils import latest_version

    version = latest_version() if kube == "latest" else kube
    for obj in rendered(variant):
        if obj["kind"] in CRD_KINDS:
            continue  # CRDs: checked by hand below
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{obj['kind']} {obj['metadata']['name']} (Kubernetes {version}): {e.message} "
                        f"at {list(e.path)}")


def test_one_kind_per_template_file_and_short_templates(helm):
    kinds: dict[str, set] = {}
    for name in ("defaults", "all_on"):
        for path, obj in documents(helm["render"][name]):
            kinds.setdefault(path, set()).add(obj["kind"])
    assert {p: k for p, k in kinds.items() if len(k) > 1} == {}
    for template in (CHART / "templates").rglob("*"):
        if template.is_file():
            assert len(template.read_text().splitlines()) <= 150, f"{template.name} is over 150 lines"


def test_every_resource_has_the_standard_labels(rendered):
    for obj in rendered("all_on"):
        labels = obj["metadata"]["labels"]
        for key in STANDARD_LABELS:
            assert labels.get(f"app.kubernetes.io/{key}"), f"{obj['kind']} lacks app.kubernetes.io/{key}"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert obj["metadata"]["namespace"] == NAMESPACE
    template = one(rendered("all_on"), "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert all(template.get(f"app.kubernetes.io/{key}") for key in STANDARD_LABELS)


# ---------------------------------------------------------------------------------------------
# The Deployment


def test_pod_layout_and_images_are_pinned(rendered):
    objs = rendered("defaults")
    spec = pod_spec(objs)
    assert [c["name"] for c in spec["initContainers"]] == ["pull-model"]
    assert [c["name"] for c in spec["containers"]] == ["sglang", "apr-server"]
    assert one(objs, "Deployment")["spec"]["strategy"]["type"] == "Recreate"
    for c in spec["containers"] + spec["initContainers"]:
        image = c["image"]
        assert re.search(r":[^/:]+$", image) and not image.endswith(":latest"), image
    assert container(objs, "sglang")["image"] == "lmsysorg/sglang:v0.5.23"
    assert container(objs, "pull-model")["image"] == "registry.example.com/apr:0.1.0"
    assert container(objs, "apr-server")["image"] == "registry.example.com/apr-serve:0.1.0"
    assert one(rendered("custom"), "Deployment")["spec"]["strategy"]["type"] == "RollingUpdate"


def test_pull_model_reads_credentials_only_from_secrets(rendered):
    for variant, uri, endpoint, secret, keys in (
            ("defaults", "s3://apr-models/models/apr-countdown/v1", "http://seaweedfs.kubeflow:9000",
             "mlpipeline-minio-artifact", ("accesskey", "secretkey")),
            ("custom", "s3://store/models/apr-countdown/v7", "http://seaweedfs.kubeflow:9000", "creds",
             ("id", "key"))):
        pull = container(rendered(variant), "pull-model")
        assert pull["command"] == ["apr", "pull", "--uri", uri, "--out", "/models/current"]
        env = env_of(pull)
        assert env["S3_ENDPOINT"]["value"] == endpoint
        for name, key in zip(("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"), keys):
            assert "value" not in env[name]
            assert env[name]["valueFrom"]["secretKeyRef"] == {"name": secret, "key": key}
        assert {"name": "models", "mountPath": "/models"} in pull["volumeMounts"]
    for obj in rendered("all_on"):  # no credential anywhere as a literal value
        for c in obj.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            for e in c.get("env", []):
                if re.search(r"KEY|TOKEN|SECRET|PASSWORD", e["name"]):
                    assert "value" not in e and "secretKeyRef" in e["valueFrom"], e


@pytest.mark.parametrize("mode", ["anonymous", "iam"])
def test_pull_model_needs_no_secret_with_a_role_or_a_public_bucket(rendered, mode):
    env = env_of(container(rendered(mode), "pull-model"))
    assert env["S3_CREDENTIALS"]["value"] == mode
    assert not [e for e in env.values() if "valueFrom" in e]  # no Secret to create first
    assert env_of(container(rendered("defaults"), "pull-model"))["S3_CREDENTIALS"]["value"] == "keys"


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["defaults", "anonymous"])
def test_the_pull_container_runs_with_its_own_command_and_env(rendered, variant, s3, tmp_path):
    """The init container's rendered command and env, run here: the Secret's keys resolved,
    the store's cluster address mapped to the S3 server on loopback, /models to a folder."""
    from conftest import S3_KEYS

    from apr import model as model_lib
    from apr import storage

    secrets = {("mlpipeline-minio-artifact", "accesskey"): S3_KEYS["AWS_ACCESS_KEY_ID"],
               ("mlpipeline-minio-artifact", "secretkey"): S3_KEYS["AWS_SECRET_ACCESS_KEY"]}
    model_dir = model_lib.save(model_lib.build("tiny", seed=0), tmp_path / "model")
    uri = REQUIRED["model"]["uri"]
    storage.upload(model_dir, uri, s3)
    bucket = storage.split_uri(uri)[0]
    s3.client().set_bucket_policy(bucket, json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": "*", "Action": ["s3:GetObject", "s3:ListBucket"],
         "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"]}]}))
    pull = container(rendered(variant), "pull-model")
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    for entry in pull["env"]:
        ref = entry.get("valueFrom", {}).get("secretKeyRef")
        env[entry["name"]] = secrets[ref["name"], ref["key"]] if ref else entry["value"]
    assert env.pop("S3_ENDPOINT") == "http://seaweedfs.kubeflow:9000"
    env["S3_ENDPOINT"] = s3.url
    models = tmp_path / "models"
    models.mkdir()
    command = [str(Path(sys.executable).parent / pull["command"][0]),
               *(str(models) + a[len("/models"):] if a.startswith("/models/") else a
                 for a in pull["command"][1:])]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert (models / "current" / "model.safetensors").read_bytes() == \
        (model_dir / "model.safetensors").read_bytes()


def test_sglang_command_gpu_and_shm(rendered):
    sglang = container(rendered("all_on"), "sglang")
    assert sglang["command"][:3] == ["python3", "-m", "sglang.launch_server"]
    args = sglang["command"]
    # loopback only: SGLang's pause and weight-update API is not for the network
    for flag, value in (("--model-path", "/models/current"), ("--host", "127.0.0.1"), ("--port", "30000")):
        assert args[args.index(flag) + 1] == value
    assert "--enable-metrics" in args and "--allow-auto-truncate" in args
    assert args[-2:] == ["--mem-fraction-static", "0.85"]  # extraArgs, last
    assert env_of(sglang)["NCCL_DEBUG"]["value"] == "WARN"
    assert "ports" not in sglang  # nothing dials it over the network
    assert container(rendered("defaults"), "sglang")["resources"]["limits"]["nvidia.com/gpu"] == 1
    custom = rendered("custom")
    limits = container(custom, "sglang")["resources"]["limits"]
    assert limits["nvidia.com/mig-3g.40gb"] == 2 and "nvidia.com/gpu" not in limits
    for variant, size in (("defaults", "8Gi"), ("custom", "16Gi")):
        volumes = {v["name"]: v for v in pod_spec(rendered(variant))["volumes"]}
        assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": size}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container(custom, "sglang")["volumeMounts"]


@pytest.mark.parametrize("variant, name", [("defaults", "apr-countdown-v1"),
                                           ("custom", "apr-countdown-v7"),
                                           ("network_default", "countdown-prod")])
def test_sglang_names_the_model_not_its_path(rendered, variant, name):
    """SGLang's metrics carry model_name: the model's <name>-<version>, or model.servedName."""
    args = container(rendered(variant), "sglang")["command"]
    assert args[args.index("--served-model-name") + 1] == name


def test_probes(rendered):
    # The GRPO sidecar's check: SGLang on loopback, so exec probes from inside the container.
    from test_k8s import sglang_probe_problems

    for variant, budget, generates in (("defaults", 1200, "false"), ("custom", 1500, "true")):
        sglang = container(rendered(variant), "sglang")
        assert sglang_probe_problems(sglang) == ([], {"exec"})
        startup = sglang["startupProbe"]
        assert "/health_generate" in startup["exec"]["command"][-1]
        assert startup["periodSeconds"] * startup["failureThreshold"] == budget
        assert env_of(sglang)["SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION"]["value"] == generates
    sglang, server = container(rendered("defaults"), "sglang"), container(rendered("defaults"), "apr-server")
    assert "127.0.0.1:30000/ready'" in sglang["readinessProbe"]["exec"]["command"][-1]
    assert "127.0.0.1:30000/health'" in sglang["livenessProbe"]["exec"]["command"][-1]
    assert server["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert server["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}


def test_apr_server_command_limits_and_auth(rendered):
    server = container(rendered("custom"), "apr-server")
    assert server["command"] == ["apr", "serve", "--engine", "sglang", "--engine-url", "http://127.0.0.1:30000",
                                 "--host", "0.0.0.0", "--port", "8000", "--max-concurrency", "3",
                                 "--request-timeout", "45", "--max-tokens", "999"]
    assert {"name": "http", "containerPort": 8000, "protocol": "TCP"} in server["ports"]
    assert "APR_API_TOKEN" not in env_of(container(rendered("defaults"), "apr-server"))
    on = container(rendered("all_on"), "apr-server")
    assert env_of(on)["APR_API_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "apr-api-token", "key": "token"}
    assert on["command"][-2:] == ["--log-level", "debug"]


def test_security_contexts(rendered):
    objs = rendered("defaults")
    pod = pod_spec(objs)["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["seccompProfile"] == {"type": "RuntimeDefault"}
    for name in ("pull-model", "apr-server"):
        ctx = container(objs, name)["securityContext"]
        assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] == 10001
        assert ctx["readOnlyRootFilesystem"] is True
        assert {"name": "tmp", "mountPath": "/tmp"} in container(objs, name)["volumeMounts"]
    for name in ("pull-model", "apr-server", "sglang"):
        ctx = container(objs, name)["securityContext"]
        assert ctx["allowPrivilegeEscalation"] is False and ctx["capabilities"]["drop"] == ["ALL"]
        assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container(objs, "sglang")["securityContext"]["runAsNonRoot"] is False  # SGLang's image is root
    assert pod_spec(objs)["automountServiceAccountToken"] is False


def test_scheduling_and_pod_metadata(rendered):
    spec = pod_spec(rendered("defaults"))
    assert spec["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert "nodeSelector" not in spec and "affinity" not in spec
    on = one(rendered("all_on"), "Deployment")["spec"]["template"]
    assert on["spec"]["nodeSelector"] == ALL_ON["nodeSelector"]
    assert on["spec"]["affinity"] == ALL_ON["affinity"]
    assert on["spec"]["priorityClassName"] == "inference"
    assert on["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    assert on["metadata"]["annotations"] == ALL_ON["podAnnotations"]
    assert on["metadata"]["labels"]["team"] == "reasoning"
    assert "tolerations" not in pod_spec(rendered("all_off"))


# ---------------------------------------------------------------------------------------------
# Service, ServiceAccount, PodDisruptionBudget, and the opt-in scale and exposure objects


def test_scale_and_exposure_objects_are_opt_in(rendered):
    defaults = rendered("defaults")
    assert not [o for o in defaults if o["kind"] in {"HorizontalPodAutoscaler", "Ingress",
                                                     "NetworkPolicy"}]
    assert one(defaults, "Deployment")["spec"]["replicas"] == 1
    assert "runtimeClassName" not in pod_spec(defaults)
    assert pod_spec(rendered("all_on"))["runtimeClassName"] == "nvidia"


def test_autoscaler_scales_the_deployment_on_in_flight_solves(rendered):
    from apr.serve.metrics import IN_FLIGHT

    objs = rendered("all_on")
    hpa, deployment = one(objs, "HorizontalPodAutoscaler"), one(objs, "Deployment")
    assert "replicas" not in deployment["spec"]  # the autoscaler owns the count
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
    [metric] = hpa["spec"]["metrics"]
    assert metric["pods"]["metric"]["name"] == IN_FLIGHT  # a series the server exports
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "8"}
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 600


def test_ingress_routes_to_the_service_port(rendered):
    objs = rendered("all_on")
    ingress, service = one(objs, "Ingress"), one(objs, "Service")
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["metadata"]["annotations"] == {"example.com/i": "j"}
    assert ingress["spec"]["tls"] == ALL_ON["ingress"]["tls"]
    [rule] = ingress["spec"]["rules"]
    assert rule["host"] == "apr.example.com"
    assert [(p["path"], p["pathType"]) for p in rule["http"]["paths"]] == [("/v1", "Prefix"),
                                                                          ("/docs", "Exact")]
    port_names = {p["name"] for p in service["spec"]["ports"]}
    for path in rule["http"]["paths"]:
        assert path["backend"]["service"]["name"] == service["metadata"]["name"]
        assert path["backend"]["service"]["port"]["name"] in port_names


@pytest.mark.parametrize("variant, peers", [
    ("all_on", ALL_ON["networkPolicy"]["from"]),
    ("network_default", [{"podSelector": {}}]),  # the release's namespace only
])
def test_network_policy_admits_only_its_peers_to_the_apr_port(rendered, variant, peers):
    objs = rendered(variant)
    policy, deployment = one(objs, "NetworkPolicy"), one(objs, "Deployment")
    assert policy["spec"]["podSelector"] == deployment["spec"]["selector"]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    [rule] = policy["spec"]["ingress"]
    server_ports = {p["name"] for p in container(objs, "apr-server")["ports"]}
    assert [p["port"] for p in rule["ports"]] == ["http"] and "http" in server_ports
    assert rule["from"] == peers


@pytest.mark.slow
def test_the_sglang_probes_run_and_fail_on_a_non_200(rendered):
    """The exec probes, run as kubelet would run them, against a server on SGLang's address:
    0 while it answers 200, non-zero on a 503 (paused) and when nothing listens."""
    import socket
    import subprocess

    from conftest import ServedApp
    from fastapi import FastAPI, Response

    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 30000)) == 0:
            pytest.skip("port 30000 is taken here")
    status = {"code": 200}
    stand_in = FastAPI()
    for path in ("/ready", "/health", "/health_generate"):
        stand_in.add_api_route(path, lambda: Response(status_code=status["code"]))
    sglang = container(rendered("defaults"), "sglang")
    commands = [sglang[p]["exec"]["command"] for p in ("startupProbe", "readinessProbe",
                                                      "livenessProbe")]

    def exit_codes():
        return [subprocess.run(c, capture_output=True, timeout=60).returncode for c in commands]

    with ServedApp(stand_in, port=30000):
        assert exit_codes() == [0, 0, 0]
        status["code"] = 503
        assert all(code != 0 for code in exit_codes())
    assert all(code != 0 for code in exit_codes())


@pytest.mark.slow
@pytest.mark.sglang
def test_sglang_runs_from_its_rendered_container_on_a_read_only_root(rendered, tmp_path):
    """The engine container as the pod runs it: its command, args and env as rendered (the
    image's python3 is the SGLang environment's, the CPU flags appended, /models/current a
    tiny model), in a mount namespace whose root is read-only with only /tmp writable, as
    readOnlyRootFilesystem and the /tmp volume make it; then its own exec probes pass."""
    import signal
    import socket
    import time

    from conftest import sglang_python_or_skip

    from apr import model as model_lib
    from apr.decode.rollout_server import sglang_cpu_args

    python = sglang_python_or_skip()
    need(subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode == 0,
         "unshare --mount (root, to make a read-only root filesystem)")
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 30000)) == 0:
            pytest.skip("port 30000 is taken here")
    sglang = container(rendered("defaults"), "sglang")
    assert sglang["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m["name"] for m in sglang["volumeMounts"]}
    assert mounts["/tmp"] == "sglang-tmp" and mounts["/models"] == "models"
    model_dir = model_lib.save(model_lib.build("tiny", seed=0), tmp_path / "model")
    command = [python if sglang["command"][0] == "python3" else sglang["command"][0],
               *("/srv" if a == "/models/current" else a for a in sglang["command"][1:]),
               *sglang_cpu_args()]
    env = {"PATH": os.environ["PATH"], **{e["name"]: e["value"] for e in sglang["env"]}}
    assert env["HOME"] == "/tmp"
    # The SGLang environment may live under /tmp (a clone there): it is put back at its own
    # path, read-only, on top of the fresh /tmp.
    environment = str(Path(python).parent.parent)
    script = ("set -e; mount --bind \"$1\" /srv; mount -o remount,bind,ro /srv; "
              "mount --bind \"$2\" /media; mount -o remount,bind,ro /media; "
              "mount -o remount,bind,ro /; mount -t tmpfs -o mode=1777 tmpfs /tmp; "
              "mkdir -p \"$2\"; mount --bind /media \"$2\"; "
              "if touch /srv/x /usr/x 2>/dev/null; then exit 97; fi; "  # really read-only
              "shift 2; exec env -i \"$@\"")
    log = open(tmp_path / "sglang.log", "w")
    engine = subprocess.Popen(
        ["unshare", "--mount", "sh", "-c", script, "sh", str(model_dir), environment,
         *(f"{k}={v}" for k, v in env.items()), *command],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    probes = {p: sglang[p]["exec"]["command"] for p in ("startupProbe", "readinessProbe",
                                                       "livenessProbe")}
    try:
        deadline = time.monotonic() + 300
        while subprocess.run(probes["startupProbe"], capture_output=True).returncode != 0:
            assert engine.poll() is None, (tmp_path / "sglang.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "SGLang did not start in 300 s"
            time.sleep(2)
        for name in ("readinessProbe", "livenessProbe"):
            assert subprocess.run(probes[name], capture_output=True).returncode == 0, name
    finally:
        if engine.poll() is None:
            os.killpg(engine.pid, signal.SIGTERM)
            engine.wait(timeout=60)
        log.close()


@pytest.mark.slow
@pytest.mark.sglang
def test_the_pod_comes_up_for_real_and_helm_test_passes(rendered, s3, tmp_path):
    """The serving pod as rendered (every option on, auth included), run by the pod runner:
    the init container pulls the published model from the S3 server, SGLang (its image: the
    SGLang environment, CPU flags appended) and the APR server start, every probe passes;
    then the `helm test` pod's own script succeeds against the Service's address."""
    import socket

    from conftest import S3_KEYS, sglang_python_or_skip
    from pod_runner import Image, PodRunner

    from apr import model as model_lib
    from apr import storage
    from apr.decode.rollout_server import sglang_cpu_args

    python = sglang_python_or_skip()
    for port in (30000, 8000):
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                pytest.skip(f"port {port} is taken here")
    objs = rendered("run_here")
    storage.upload(model_lib.save(model_lib.build("tiny", seed=0), tmp_path / "model"),
                   REQUIRED["model"]["uri"], s3)
    here = Path(sys.executable).parent

    def images(reference: str) -> Image:
        repository = reference.rsplit(":", 1)[0]
        if repository.endswith("lmsysorg/sglang"):
            return Image({"python3": python}, {"python3": tuple(sglang_cpu_args())})
        if repository.endswith(("/apr", "/apr-serve")):
            return Image({"apr": str(here / "apr"), "python3": sys.executable})
        if repository.endswith("curlimages/curl"):
            return Image({"/bin/sh": "/bin/sh"})  # and curl from PATH
        raise AssertionError(f"no stand-in for image {reference}")

    token = "a-test-token"
    secrets = {("mlpipeline-minio-artifact", "accesskey"): S3_KEYS["AWS_ACCESS_KEY_ID"],
               ("mlpipeline-minio-artifact", "secretkey"): S3_KEYS["AWS_SECRET_ACCESS_KEY"],
               ("apr-api-token", "token"): token}
    hosts = {"http://seaweedfs.kubeflow:9000": s3.url,
             f"{FULLNAME}.{NAMESPACE}.svc": "127.0.0.1"}
    with PodRunner(pod_spec(objs), images, tmp_path / "pod", secrets, hosts=hosts) as pod:
        pod.start()
        assert (tmp_path / "pod" / "volumes" / "models" / "current" / "model.safetensors").is_file()
        hook = one(objs, "Pod")["spec"]
        with PodRunner(hook, images, tmp_path / "hook", secrets, hosts=hosts) as test_pod:
            output = test_pod.run_to_completion(hook["containers"][0], timeout_s=240)
        health, solve = output.splitlines()[-2:]  # the script prints each answer on a line
        assert json.loads(health) == {"status": "ok"}
        solved = json.loads(solve)
        assert {"threads", "tokens", "latency_s"} <= solved.keys()
        import httpx

        unauthorised = httpx.post("http://127.0.0.1:8000/v1/solve", timeout=30,
                                  json={"nums": [1, 2, 3], "target": 6})
        assert unauthorised.status_code == 401  # the token from the Secret is in force
        assert 'apr_requests_total{mode="apr",outcome="incorrect"} 1.0' in httpx.get(
            "http://127.0.0.1:8000/metrics", timeout=30).text  # the hook's solve (untrained)
        assert 'model_name="apr-countdown-v1"' in httpx.get(  # SGLang's, through the APR port
            "http://127.0.0.1:8000/engine/metrics", timeout=30).text


def test_service_selects_the_serving_pod_and_not_the_test_pod(rendered):
    objs = rendered("defaults")
    service = one(objs, "Service")
    assert service["metadata"]["name"] == FULLNAME
    ports = {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]}
    assert ports == {"http": (8000, "http")}  # the APR API only, never SGLang's
    selector = service["spec"]["selector"]
    deployment = one(objs, "Deployment")
    assert deployment["spec"]["selector"]["matchLabels"] == selector
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert not selector.items() <= one(objs, "Pod")["metadata"]["labels"].items()


def test_service_account_toggle(rendered):
    sa = one(rendered("defaults"), "ServiceAccount")
    assert sa["metadata"]["name"] == pod_spec(rendered("defaults"))["serviceAccountName"] == FULLNAME
    assert sa["automountServiceAccountToken"] is False
    assert one(rendered("all_on"), "ServiceAccount")["metadata"]["annotations"] == {"iam.example.com/role": "apr"}
    assert of_kind(rendered("all_off"), "ServiceAccount") == []
    assert pod_spec(rendered("all_off"))["serviceAccountName"] == "shared-sa"


def test_pod_disruption_budget_toggle(rendered):
    pdb = one(rendered("defaults"), "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1 and "minAvailable" not in pdb["spec"]
    assert pdb["spec"]["selector"]["matchLabels"] == one(rendered("defaults"), "Service")["spec"]["selector"]
    pdb = one(rendered("all_on"), "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == "50%" and "maxUnavailable" not in pdb["spec"]
    assert of_kind(rendered("all_off"), "PodDisruptionBudget") == []


# ---------------------------------------------------------------------------------------------
# Monitoring: ServiceMonitor, PrometheusRule, dashboards


@pytest.mark.parametrize("variant", ["defaults", "metrics_only", "features_without_master"])
def test_monitoring_needs_both_flags(rendered, variant):
    objs = rendered(variant)
    assert of_kind(objs, "ServiceMonitor") == [] and of_kind(objs, "PrometheusRule") == []


def test_service_monitor_scrapes_both_servers_through_the_apr_port(rendered):
    objs = rendered("all_on")
    monitor = one(objs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kps"
    spec = monitor["spec"]
    assert spec["selector"]["matchLabels"].items() <= one(objs, "Service")["metadata"]["labels"].items()
    assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    service_ports = {p["name"] for p in one(objs, "Service")["spec"]["ports"]}
    assert {(e["port"], e["path"]) for e in spec["endpoints"]} == {("http", "/metrics"),
                                                                 ("http", "/engine/metrics")}
    assert {e["port"] for e in spec["endpoints"]} <= service_ports
    for endpoint in spec["endpoints"]:
        assert re.fullmatch(r"\d+[smh]", endpoint["interval"]) and re.fullmatch(r"\d+[smh]", endpoint["scrapeTimeout"])


def rules_of(objs: list[dict]) -> dict:
    rule = one(objs, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(rule["spec"]) == {"groups"}
    return rule["spec"]


def test_prometheus_rule_alerts(rendered):
    from apr.serve.metrics import ALL

    spec = rules_of(rendered("all_on"))
    rules = {r["alert"]: r for g in spec["groups"] for r in g["rules"]}
    assert set(rules) == {"AprHighRequestLatency", "AprHighErrorRate", "AprEngineDown",
                          "AprEngineQueueSaturated", "AprKVCacheSaturated"}
    assert "histogram_quantile(0.99" in rules["AprHighRequestLatency"]["expr"]
    assert re.search(r">\s*60\s*$", rules["AprHighRequestLatency"]["expr"])
    assert re.search(r">\s*0.05\s*$", rules["AprHighErrorRate"]["expr"])
    assert rules["AprEngineDown"]["for"] == "5m" and "== 0" in rules["AprEngineDown"]["expr"]
    for rule in rules.values():
        assert rule["labels"]["severity"] in {"warning", "critical"} and rule["annotations"]["summary"]
        for name in re.findall(r"\bapr_[a-z_]+", rule["expr"]):
            assert re.sub(r"_(bucket|sum|count)$", "", name) in ALL, name
        for name in re.findall(r"\bsglang:[a-z_]+", rule["expr"]):
            assert name in SGLANG_METRICS, name
        assert f'namespace="{NAMESPACE}",service="{FULLNAME}"' in rule["expr"]
        # the runbook: a section of the chart README named after the alert
        base, anchor = rule["annotations"]["runbook_url"].split("#")
        assert base.endswith("/helm/apr-server/README.md") and anchor == rule["alert"].lower()
        assert f"\n### {rule['alert']}\n" in (CHART / "README.md").read_text()
    custom = {r["alert"]: r for g in rules_of(rendered("custom"))["groups"] for r in g["rules"]}
    assert re.search(r">\s*12.5\s*$", custom["AprHighRequestLatency"]["expr"])
    assert re.search(r">\s*0.2\s*$", custom["AprHighErrorRate"]["expr"])


@pytest.fixture(scope="session")
def promtool() -> str:
    path = shutil.which("promtool")
    need(path is not None, "promtool (Debian package prometheus)")
    return path


def test_prometheus_rules_pass_promtool_check(rendered, promtool, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump(rules_of(rendered("all_on"))))
    check = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "5 rules found" in check.stdout


def test_alerts_fire_on_synthetic_series(rendered, promtool, tmp_path):
    """promtool's unit tests: each alert fires on bad series and stays quiet on good ones."""
    spec = rules_of(rendered("all_on"))
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(spec))
    rules = {r["alert"]: r for g in spec["groups"] for r in g["rules"]}
    sel = f'namespace="{NAMESPACE}",service="{FULLNAME}"'

    def fired(alert, labels=None, pod=""):
        annotations = {k: v.replace("{{ $labels.pod }}", pod) for k, v in rules[alert]["annotations"].items()}
        return [{"exp_labels": {**rules[alert]["labels"], **(labels or {})}, "exp_annotations": annotations}]

    def bucket(le, per_minute):
        return {"series": f'apr_request_duration_seconds_bucket{{{sel},le="{le}"}}', "values": f"0+{per_minute}x20"}

    slow = [bucket("1", 0), bucket("60", 0), bucket("120", 10), bucket("+Inf", 10)]
    fast = [bucket("1", 10), bucket("60", 10), bucket("120", 10), bucket("+Inf", 10)]
    requests = {"series": f'apr_requests_total{{{sel},mode="apr",outcome="correct"}}', "values": "0+100x20"}
    tests = [
        {"interval": "1m", "input_series": slow, "alert_rule_test": [
            {"eval_time": "5m", "alertname": "AprHighRequestLatency", "exp_alerts": []},
            {"eval_time": "16m", "alertname": "AprHighRequestLatency", "exp_alerts": fired("AprHighRequestLatency")}]},
        {"interval": "1m", "input_series": fast, "alert_rule_test": [
            {"eval_time": "16m", "alertname": "AprHighRequestLatency", "exp_alerts": []}]},
        {"interval": "1m", "input_series": [requests, {"series": f'apr_errors_total{{{sel},kind="engine_unavailable"}}',
                                                        "values": "0+10x20"}], "alert_rule_test": [
            {"eval_time": "16m", "alertname": "AprHighErrorRate", "exp_alerts": fired("AprHighErrorRate")}]},
        {"interval": "1m", "input_series": [requests, {"series": f'apr_errors_total{{{sel},kind="timeout"}}',
                                                        "values": "0+1x20"}], "alert_rule_test": [
            {"eval_time": "16m", "alertname": "AprHighErrorRate", "exp_alerts": []}]},
        # every request failing: no answered requests at all must still alert
        {"interval": "1m", "input_series": [{"series": f'apr_errors_total{{{sel},kind="engine_unavailable"}}',
                                             "values": "0+10x20"}], "alert_rule_test": [
            {"eval_time": "16m", "alertname": "AprHighErrorRate", "exp_alerts": fired("AprHighErrorRate")}]},
        # clients sending bad requests is not the server failing
        {"interval": "1m", "input_series": [requests, {"series": f'apr_errors_total{{{sel},kind="bad_request"}}',
                                                        "values": "0+50x20"}], "alert_rule_test": [
            {"eval_time": "16m", "alertname": "AprHighErrorRate", "exp_alerts": []}]},
        {"interval": "1m", "input_series": [{"series": f'apr_engine_up{{{sel},pod="p-1"}}', "values": "1 0x10"},
                                            {"series": f'apr_engine_up{{{sel},pod="p-2"}}', "values": "1x10"}],
         "alert_rule_test": [
            {"eval_time": "3m", "alertname": "AprEngineDown", "exp_alerts": []},
            {"eval_time": "8m", "alertname": "AprEngineDown",
             "exp_alerts": fired("AprEngineDown", {"namespace": NAMESPACE, "service": FULLNAME, "pod": "p-1"}, "p-1")}]},
    ]
    for alert, metric, busy, calm in (("AprEngineQueueSaturated", "sglang:num_queue_reqs", 40, 31),
                                      ("AprKVCacheSaturated", "sglang:token_usage", 0.97, 0.9)):
        def gauge(value, pod="p-1"):
            return {"series": f'{metric}{{{sel},pod="{pod}",model_name="m"}}', "values": f"{value}x20"}
        tests += [
            {"interval": "1m", "input_series": [gauge(busy), gauge(0, "p-2")], "alert_rule_test": [
                {"eval_time": "5m", "alertname": alert, "exp_alerts": []},
                {"eval_time": "12m", "alertname": alert, "exp_alerts": fired(alert, {"pod": "p-1"}, "p-1")}]},
            {"interval": "1m", "input_series": [gauge(calm)], "alert_rule_test": [
                {"eval_time": "12m", "alertname": alert, "exp_alerts": []}]},
        ]
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump({"rule_files": ["rules.yaml"], "evaluation_interval": "1m",
                                                         "tests": tests}))
    run = subprocess.run([promtool, "test", "rules", "tests.yaml"], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_dashboard_config_maps(rendered):
    files = sorted((CHART / "dashboards").glob("*.json"))
    assert files
    assert of_kind(rendered("defaults"), "ConfigMap") == []  # opt-in
    for variant, label, value in (("all_on", "grafana_dashboard", "1"), ("custom", "grafana.io/dashboard", "apr")):
        maps = of_kind(rendered(variant), "ConfigMap")
        assert len(maps) == len(files)
        by_key = {key: (cm, data) for cm in maps for key, data in cm["data"].items()}
        assert set(by_key) == {f.name for f in files}
        for f in files:
            cm, data = by_key[f.name]
            assert cm["metadata"]["labels"][label] == value
            assert json.loads(data) == json.loads(f.read_text())
    assert one(rendered("all_on"), "ConfigMap")["metadata"]["annotations"] == {"grafana_folder": "APR"}


# ---------------------------------------------------------------------------------------------
# The helm test hook and NOTES


def test_helm_test_hook(rendered):
    pod = one(rendered("defaults"), "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["metadata"]["labels"]["app.kubernetes.io/component"] == "test"
    (curl,) = pod["spec"]["containers"]
    assert curl["image"] == "curlimages/curl:8.11.0"
    script = " ".join(curl["command"] + curl["args"])
    url = f"http://{FULLNAME}.{NAMESPACE}.svc:8000"
    assert f"{url}/healthz" in script and f"{url}/v1/solve" in script
    assert """'{"nums":[1,2,3,4],"target":24}'""" in script and 'test "$code" = 200' in script
    assert "Authorization" not in script
    (curl,) = one(rendered("all_on"), "Pod")["spec"]["containers"]
    assert "Authorization: Bearer ${APR_API_TOKEN}" in curl["args"][0]
    assert env_of(curl)["APR_API_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "apr-api-token"
    assert of_kind(rendered("all_off"), "Pod") == []


def test_notes_say_how_to_reach_the_server(helm):
    notes = helm["render"]["defaults"]["notes"]
    assert f"port-forward svc/{FULLNAME} 8000:8000" in notes
    assert "/v1/solve" in notes and '"target": 24' in notes and f"helm test {RELEASE}" in notes
    assert "Authorization" not in notes and "metrics.serviceMonitor.enabled" in notes
    assert "Ingress" not in notes and "HorizontalPodAutoscaler" not in notes
    notes = helm["render"]["all_on"]["notes"]
    assert "get secret apr-api-token" in notes and "metrics.serviceMonitor.enabled" not in notes
    assert "https://apr.example.com/v1" in notes and "describe hpa" in notes


# ---------------------------------------------------------------------------------------------
# values.yaml, values.schema.json, helpers, Chart.yaml, README (no Helm needed)


def values() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def schema() -> dict:
    return json.loads((CHART / "values.schema.json").read_text())


def resolve(node: dict, root: dict) -> dict:
    while "$ref" in node:
        node = {**root["definitions"][node["$ref"].split("/")[-1]], **{k: v for k, v in node.items() if k != "$ref"}}
    return node


def schema_paths(node: dict, root: dict, prefix: str = "") -> set[str]:
    """Dotted paths of every named property (open maps, described by additionalProperties, end a path)."""
    node = resolve(node, root)
    paths = set()
    for key, child in node.get("properties", {}).items():
        paths.add(prefix + key)
        paths |= schema_paths(child, root, prefix + key + ".")
    return paths


def value_paths(value, node: dict, root: dict, prefix: str = "") -> set[str]:
    node = resolve(node, root)
    if not isinstance(value, dict) or "properties" not in node:
        return set()
    paths = set()
    for key, child in value.items():
        paths.add(prefix + key)
        paths |= value_paths(child, node["properties"].get(key, {}), root, prefix + key + ".")
    return paths


def test_values_and_schema_have_the_same_keys():
    s = schema()
    in_values, in_schema = value_paths(values(), s, s), schema_paths(s, s)
    assert sorted(in_values - in_schema) == [], "keys of values.yaml missing from values.schema.json"
    assert sorted(in_schema - in_values) == [], "keys of values.schema.json missing from values.yaml"


def test_schema_validates_values_and_rejects_bad_ones():
    import jsonschema

    s = schema()
    jsonschema.Draft7Validator.check_schema(s)
    validator = jsonschema.Draft7Validator(s)
    assert list(validator.iter_errors(values())) == []
    for override in ({"sglang": {"gpu": {"count": "two"}}}, {"sglang": {"gpu": {"count": 0}}},
                     {"image": {"sglang": {"tag": "latest"}}}, {"typo": 1}, {"service": {"port": 70000}},
                     {"model": {"s3": {"accessKey": {"secretName": ""}}}}, {"model": {"uri": "minio://x"}},
                     {"model": {"s3": {"secretKey": {"value": "a literal credential"}}}},
                     {"server": {"auth": {"enabled": True, "existingSecret": ""}}},
                     {"podDisruptionBudget": {"minAvailable": "half"}}, {"sglang": {"shm": {"sizeLimit": "8 GB"}}}):
        assert list(validator.iter_errors(merged(values(), override))), f"schema accepts {override}"


def test_every_value_is_documented():
    """Every key of a mapping in values.yaml (not inside lists) has a comment on the line above."""
    lines = (CHART / "values.yaml").read_text().splitlines()

    def keys(node):
        if isinstance(node, yaml.MappingNode):
            for key, child in node.value:
                yield key
                yield from keys(child)

    for key in keys(yaml.compose((CHART / "values.yaml").read_text())):
        above = lines[key.start_mark.line - 1].strip() if key.start_mark.line else ""
        assert above.startswith("#"), f"values.yaml:{key.start_mark.line + 1} {key.value} has no comment above it"


def test_every_value_is_in_the_chart_readme():
    readme = (CHART / "README.md").read_text()
    s = schema()
    missing = [p for p in sorted(value_paths(values(), s, s)) if f"`{p}`" not in readme]
    assert missing == []


def test_every_helper_has_a_doc_comment():
    for helpers in (CHART / "templates").glob("_*.tpl"):
        text = helpers.read_text()
        names = re.findall(r'{{-? define "([^"]+)"', text)
        assert names
        for name in names:
            doc = r"{{/\*\s*" + re.escape(name) + r": .*?\*/}}\s*{{-? define \"" + re.escape(name) + '"'
            assert re.search(doc, text, re.S), f"{helpers.name}: {name} has no doc comment"


def test_chart_metadata():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == "apr-server"
    assert chart["version"] == "0.1.0" and chart["appVersion"] == "0.1.0"
    assert chart["kubeVersion"] == ">=1.29.0-0"
    assert (CHART / ".helmignore").is_file() and (CHART / "templates" / "NOTES.txt").is_file()


if __name__ == "__main__":  # the child process of the `helm` fixture
    json.dump(_child(json.load(sys.stdin)), sys.stdout)

"""The Job launcher against a fake Kubernetes API server on loopback, driven by the real client.

The fake serves only what the launcher calls (Jobs or TrainJobs, the pod list, pod logs) and
plays one of them, whose course each test scripts: the pod appears, the trainer starts after a
few status reads, and it exits once its log has been streamed to the end.
"""

from __future__ import annotations

import asyncio
import copy
import json
import signal
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import kubernetes
import kubernetes_validate
import pytest
from conftest import ServedApp
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pod_runner import PodRunner

from apr import storage
from apr.cluster import grpo_job as grpo_launch
from apr.cluster import jobs as launch
from apr.cluster.grpo_job import GRPOJobSpec, grpo_job
from apr.cluster.jobs import JobFailed, LaunchError, launch_job
from apr.cluster.rbac import rbac_manifests
from apr.cluster.trainjob import TrainJobSpec, trainjob

NAME, NS = "grpo-run-1", "kubeflow"
LINES = ("step 1 loss 0.91", "step 2 loss 0.74", '{"step": 3, "loss": 0.52}', "saved checkpoint")


@dataclass
class Script:
    """How the fake cluster's Job goes; each test changes a few fields."""

    lines: tuple[str, ...] = LINES  # the trainer's log
    exit_code: int = 0
    pod_after: int = 1  # Job reads before its pod exists
    start_after: int = 2  # Job reads before the trainer runs
    drop_after: int | None = None  # the first log stream closes after this many lines
    hang: bool = False  # the trainer never exits; its log stream stays open
    waiting: dict[str, tuple[str, str]] = field(default_factory=dict)  # container: reason, message
    crashed: dict[str, tuple[int, tuple[str, ...]]] = field(default_factory=dict)  # exit code, log
    unschedulable: str | None = None  # the scheduler's message
    existing: bool = False  # a Job of this name is there already, with a finished pod
    delete_reads: int = 2  # reads a deleted Job still answers before it is gone
    read_errors: dict[int, int] = field(default_factory=dict)  # Job read number: HTTP status
    refused: str | None = None  # no pod is ever made; the event that says why
    suspended: bool = False  # held by a queue: spec.suspend, and no pod
    deleted_at: int | None = None  # from this Job read on, someone else is deleting it
    kind: str = "Job"  # or "TrainJob": a custom object whose JobSet's node 0 runs `node`
    live: Callable[[dict], PodRunner] | None = None  # the pod spec runs here, for real


def _status_error(code: int, reason: str, message: str) -> JSONResponse:
    return JSONResponse({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                         "message": message, "reason": reason, "code": code}, status_code=code)


def _container(name: str, state: dict, *, ready: bool = False, restarts: int = 0,
               last: dict | None = None) -> dict:
    status = {"name": name, "image": f"example/{name}:1", "imageID": "", "ready": ready,
              "restartCount": restarts, "state": state}
    return {**status, "lastState": last} if last else status


class FakeCluster:
    """The API server's state for one Job name, advanced by the launcher's own reads."""

    def __init__(self, script: Script):
        self.script = script
        self.job: dict | None = None
        self.deleting = 0  # reads left before a deleted Job disappears
        self.reads = 0
        self.trainer = "waiting"  # then "running", then "terminated"
        self.follows = 0
        self.calls: list[tuple[str, str, str]] = []  # (verb, resource, detail), as RBAC sees them
        self.old_pod: dict | None = None
        self.created: dict | None = None  # the manifest the launcher sent
        self.job_gets = 0
        self.pod: PodRunner | None = None  # with script.live: the Job's pod, running here
        self.pod_error: BaseException | None = None
        self.trainjob = script.kind == "TrainJob"
        self.container = "node" if self.trainjob else "trainer"
        if script.existing:
            self.job = self._new_job({"metadata": {"name": NAME, "namespace": NS}}, "old-run")
            self.old_pod = self._pod("old-run", trainer=_container(
                self.container, {"terminated": {"exitCode": 1, "reason": "Error"}}), phase="Failed")

    def _new_job(self, body: dict, uid: str) -> dict:
        job = copy.deepcopy(body)
        job["metadata"].update(uid=uid, creationTimestamp="2026-01-01T00:00:00Z")
        return job

    def _pod(self, uid: str, trainer: dict, phase: str, init: list | None = None,
             conditions: list | None = None) -> dict:
        labels, owner = {"job-name": NAME}, {"name": NAME, "uid": uid}
        if self.trainjob:  # the JobSet's indexed Job `node`, its pod of completion index 0
            labels = {"jobset.sigs.k8s.io/jobset-name": NAME, "job-name": f"{NAME}-node-0",
                      "batch.kubernetes.io/job-completion-index": "0"}
            owner = {"name": f"{NAME}-node-0", "uid": f"jobset-job-{uid}"}
        return {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"{NAME}-{uid[:5]}", "namespace": NS,
                         "labels": labels, "creationTimestamp": "2026-01-01T00:00:01Z",
                         "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job",
                                              "controller": True, **owner}]},
            "status": {"phase": phase, "conditions": conditions or [],
                       "initContainerStatuses": init or [], "containerStatuses": [trainer]},
        }

    def read_job(self) -> dict | None:
        """The Job with its status; each read of a live Job is one tick of its course."""
        if self.job is None:
            return None
        if self.deleting:
            self.deleting -= 1
            if not self.deleting:
                self.job = None
                if self.trainjob:  # Foreground: the JobSet's pods went before it
                    self.old_pod = None
            return self.job
        self.reads += 1
        s = self.script
        blocked = s.waiting or s.crashed or s.unschedulable
        if self.pod is not None:
            self.trainer, code = self.pod.state(self.container)
            if self.pod_error is not None and self.trainer == "waiting":  # never started
                self.trainer, code = "terminated", 1
            s.exit_code = code or 0
        elif self.trainer == "waiting" and self.reads > s.start_after and not blocked:
            self.trainer = "running"
        if self.trainer != "terminated":
            status = {"active": 1}
        elif s.exit_code == 0:
            status = {"succeeded": 1, "conditions": [
                {"type": "Complete", "status": "True", "reason": "Completed"}]}
        else:
            status = {"failed": 1, "conditions": [
                {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                 "message": "Job has reached the specified backoff limit"}]}
        return {**self.job, "status": status}

    def pods(self) -> list[dict]:
        pods = [self.old_pod] if self.old_pod else []
        if self.job is None or self.deleting or self.reads < self.script.pod_after \
                or self.script.refused or self.script.suspended:
            return pods
        s, uid = self.script, self.job["metadata"]["uid"]
        if s.unschedulable:
            return pods + [self._pod(uid, _container(self.container, {"waiting": {"reason": "Pending"}}),
                                     "Pending", conditions=[
                {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                 "message": s.unschedulable}])]
        init = [] if self.trainjob else [
            _container("pull-model", {"terminated": {"exitCode": 0, "reason": "Completed"}}),
            _container("sglang", {"running": {}}, ready=True)]
        if self.pod is not None:
            init = [self._live_status(c["name"]) for c in self.pod.spec.get("initContainers", [])]
        for i, c in enumerate(init):
            if c["name"] in s.waiting:
                reason, message = s.waiting[c["name"]]
                init[i] = _container(c["name"], {"waiting": {"reason": reason, "message": message}})
            if c["name"] in s.crashed:
                init[i] = _container(
                    c["name"], {"waiting": {"reason": "CrashLoopBackOff",
                                            "message": "back-off 20s restarting failed container"}},
                    restarts=2, last={"terminated": {"exitCode": s.crashed[c["name"]][0],
                                                     "reason": "Error"}})
        if self.container in s.waiting:
            reason, message = s.waiting[self.container]
            trainer, phase = {"waiting": {"reason": reason, "message": message}}, "Pending"
        elif self.trainer == "waiting":
            trainer, phase = {"waiting": {"reason": "PodInitializing"}}, "Pending"
        elif self.trainer == "running":
            trainer, phase = {"running": {"startedAt": "2026-01-01T00:00:05Z"}}, "Running"
        else:
            code = s.exit_code
            trainer = {"terminated": {"exitCode": code, "reason": "Completed" if code == 0 else "Error"}}
            phase = "Succeeded" if code == 0 else "Failed"
        return pods + [self._pod(uid, _container(self.container, trainer), phase, init)]

    def _live_status(self, name: str) -> dict:
        state, code = self.pod.state(name)
        if state == "terminated":
            return _container(name, {"terminated": {"exitCode": code,
                                                     "reason": "Completed" if code == 0 else "Error"}})
        if state == "running":
            return _container(name, {"running": {}}, ready=name in self.pod.started)
        return _container(name, {"waiting": {"reason": "PodInitializing"}})

    def start_live(self, body: dict) -> None:
        """The created Job's pod, run here in a thread (its course is the processes')."""
        self.pod = self.script.live(body["spec"]["template"]["spec"])

        def course():
            try:
                self.pod.run_pod()
            except BaseException as e:  # the launcher sees it as the trainer never starting
                self.pod_error = e
                self.pod.stop()

        threading.Thread(target=course, daemon=True).start()

    def log_lines(self, pod: str, container: str, previous: bool) -> tuple[str, ...] | None:
        """A container's log, None where the API would refuse (never started)."""
        if self.pod is not None:
            if self.pod.state(container)[0] == "waiting":
                return None
            return tuple(self.pod.log(container, lines=10**9).splitlines())
        if self.old_pod and pod == self.old_pod["metadata"]["name"]:
            return ("the old run's log",)
        if container == self.container:
            return None if self.trainer == "waiting" else self.script.lines
        if container in self.script.crashed:
            return self.script.crashed[container][1] if previous else None
        return None if container in self.script.waiting else ()


def fake_api(current: dict[str, FakeCluster]) -> FastAPI:
    """The REST endpoints the launcher calls, answered by `current["cluster"]` (one per test)."""
    app = FastAPI()
    jobs = "/apis/batch/v1/namespaces/{ns}/jobs"
    trainjobs = "/apis/trainer.kubeflow.org/v1alpha1/namespaces/{ns}/trainjobs"

    def resource(request: Request) -> str:
        """The resource asked for, which must be the kind the test plays."""
        name = "trainjobs" if "/trainjobs" in request.url.path else "jobs"
        assert name == ("trainjobs" if current["cluster"].trainjob else "jobs")
        return name

    @app.post(jobs)
    @app.post(trainjobs)
    async def create_job(ns: str, request: Request):
        cluster = current["cluster"]
        body = await request.json()
        cluster.calls.append(("create", resource(request), body["metadata"]["name"]))
        if cluster.job is not None:
            return _status_error(409, "AlreadyExists", f'jobs.batch "{NAME}" already exists')
        cluster.job, cluster.created = cluster._new_job(body, str(uuid.uuid4())), body
        cluster.reads, cluster.trainer = 0, "waiting"
        if cluster.script.live is not None:
            cluster.start_live(body)
        return JSONResponse({**cluster.job, "status": {}}, status_code=201)

    @app.get(jobs + "/{name}")
    @app.get(trainjobs + "/{name}")
    async def read_job(ns: str, name: str, request: Request):
        cluster = current["cluster"]
        cluster.calls.append(("get", resource(request), name))
        cluster.job_gets += 1
        status = cluster.script.read_errors.get(cluster.job_gets)
        if status == 404:
            cluster.job = None  # deleted by someone else
        elif status:
            return _status_error(status, "ServiceUnavailable", "etcdserver: request timed out")
        job = cluster.read_job()
        if job is None:
            return _status_error(404, "NotFound", f'jobs.batch "{name}" not found')
        if cluster.script.suspended:
            job = {**job, "spec": {**job["spec"], "suspend": True}}
        if cluster.script.deleted_at and cluster.job_gets >= cluster.script.deleted_at:
            job = {**job, "metadata": {**job["metadata"],
                                       "deletionTimestamp": "2026-01-01T00:00:09Z"}}
        return job

    @app.delete(jobs + "/{name}")
    @app.delete(trainjobs + "/{name}")
    async def delete_job(ns: str, name: str, request: Request, propagationPolicy: str = ""):
        cluster = current["cluster"]
        cluster.calls.append(("delete", resource(request), f"{name} {propagationPolicy}"))
        if cluster.job is None:
            return _status_error(404, "NotFound", f'jobs.batch "{name}" not found')
        cluster.deleting = cluster.script.delete_reads
        if not cluster.deleting:
            cluster.job = None
        return {"kind": "Status", "apiVersion": "v1", "status": "Success"}

    @app.get("/api/v1/namespaces/{ns}/pods")
    async def list_pods(ns: str, labelSelector: str = ""):
        cluster = current["cluster"]
        cluster.calls.append(("list", "pods", labelSelector))
        assert labelSelector == (
            f"jobset.sigs.k8s.io/jobset-name={NAME},batch.kubernetes.io/job-completion-index=0"
            if cluster.trainjob else f"job-name={NAME}")
        return {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": cluster.pods()}

    @app.get("/api/v1/namespaces/{ns}/events")
    async def list_events(ns: str, fieldSelector: str = ""):
        cluster = current["cluster"]
        cluster.calls.append(("list", "events", fieldSelector))
        uid = cluster.job["metadata"]["uid"] if cluster.job else None
        items = [{"metadata": {"name": f"{NAME}.1"}, "involvedObject": {"kind": "Job", "uid": uid},
                  "type": "Warning", "reason": "FailedCreate", "message": cluster.script.refused}
                 ] if cluster.script.refused and fieldSelector == f"involvedObject.uid={uid}" else []
        return {"kind": "EventList", "apiVersion": "v1", "metadata": {}, "items": items}

    @app.get("/api/v1/namespaces/{ns}/pods/{pod}/log")
    async def pod_log(ns: str, pod: str, request: Request, container: str, follow: bool = False,
                      previous: bool = False, tailLines: int | None = None):
        cluster = current["cluster"]
        cluster.calls.append(("get", "pods/log", f"{pod} {container}"))
        lines = cluster.log_lines(pod, container, previous)
        if lines is None:
            return _status_error(400, "BadRequest",
                                 f'container "{container}" in pod "{pod}" is waiting to start')
        if not follow:
            return PlainTextResponse("".join(f"{x}\n" for x in lines[-(tailLines or 0):]))
        cluster.follows += 1
        if cluster.pod is not None:  # the real container's log, as it grows, to its end
            async def live():
                sent = 0
                while True:
                    ended = cluster.pod.state(container)[0] == "terminated"
                    current = cluster.log_lines(pod, container, False) or ()
                    for line in current[sent:]:
                        yield f"{line}\n".encode()
                    sent = len(current)
                    if ended or await request.is_disconnected():
                        return
                    await asyncio.sleep(0.1)

            return StreamingResponse(live(), media_type="text/plain")
        first = cluster.follows == 1
        sent = lines[:cluster.script.drop_after] if first and cluster.script.drop_after else lines

        async def stream():
            for line in sent:
                yield f"{line}\n".encode()
                await asyncio.sleep(0.002)
            if cluster.script.hang:
                for _ in range(100):  # open until the client hangs up (or 5 s)
                    if await request.is_disconnected():
                        return
                    await asyncio.sleep(0.05)
            elif len(sent) == len(lines) and cluster.trainer == "running":
                cluster.trainer = "terminated"  # the stream ends because the trainer exited

        return StreamingResponse(stream(), media_type="text/plain")

    return app


@pytest.fixture(scope="module")
def api_server():
    """A fake API server on loopback and a real client for it: (the holder of its state, client)."""
    current: dict[str, FakeCluster] = {}
    with ServedApp(fake_api(current), log_level="error", timeout_graceful_shutdown=2) as served:
        client = kubernetes.client.ApiClient(kubernetes.client.Configuration(host=served.url))
        yield current, client
        client.close()


@pytest.fixture
def cluster(request, api_server):
    """The fake cluster playing `Script(**param)`, and the client: (FakeCluster, ApiClient)."""
    current, client = api_server
    current["cluster"] = FakeCluster(Script(**getattr(request, "param", {})))
    return current["cluster"], client


def _manifest() -> dict:
    return grpo_job(GRPOJobSpec(name=NAME, namespace=NS, model_uri="s3://apr-models/models/apr/v1"))


def _launch(client, logged: list[str], **kwargs) -> dict:
    return launch_job(_manifest(), poll_s=0.02, log=logged.append, api_client=client, **kwargs)


def _trainer_lines(logged: list[str]) -> list[str]:
    return [x for x in logged if not x.startswith("launcher: ")]


def _deleted(fake: FakeCluster) -> list[str]:
    return [detail for verb, resource, detail in fake.calls if verb == "delete"]


def test_a_completed_job_streams_the_trainer_log_in_order_and_is_deleted(cluster):
    fake, client = cluster
    logged: list[str] = []
    summary = _launch(client, logged)
    assert summary["succeeded"] is True and summary["seconds"] < 5
    assert (summary["name"], summary["namespace"]) == (NAME, NS)
    assert _trainer_lines(logged) == list(LINES)  # once each, in order, JSON lines as text
    assert fake.follows == 1  # one stream, to the end: no re-reading of the log
    assert _deleted(fake) == [f"{NAME} Foreground"] and fake.calls[-1][0] == "delete"


def test_the_client_the_launcher_makes_is_closed_when_the_job_ends(cluster, monkeypatch):
    fake, client = cluster
    settings = kubernetes.client.Configuration(host=client.configuration.host)
    monkeypatch.setattr(kubernetes.client.Configuration, "_default", settings)
    monkeypatch.setattr(launch, "load_kube_config", lambda: None)
    closed = []
    close = kubernetes.client.ApiClient.close
    monkeypatch.setattr(kubernetes.client.ApiClient, "close",
                        lambda self: (closed.append(self), close(self)))
    assert launch_job(_manifest(), poll_s=0.02, log=[].append)["succeeded"] is True
    assert len(closed) == 1 and closed[0] is not client  # its own, not one it was given
    assert _deleted(fake) == [f"{NAME} Foreground"]


def test_from_a_kfp_step_the_job_is_owned_by_the_step_pod_in_its_namespace(
        cluster, monkeypatch, tmp_path):
    fake, client = cluster
    namespace_file = tmp_path / "namespace"
    monkeypatch.setattr(launch, "POD_NAMESPACE_FILE", str(namespace_file))
    monkeypatch.setenv("KFP_POD_NAME", "pipeline-grpo-step-1234")
    monkeypatch.setenv("KFP_POD_UID", "9a7e0b2c-0000-4000-8000-000000000001")
    assert launch.step_pod_owner(NS) is None  # not in a pod: no namespace file
    namespace_file.write_text(NS + "\n")
    assert launch.step_pod_owner("other-namespace") is None  # would count as a missing owner
    _launch(client, [])
    assert fake.created["metadata"]["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "Pod", "name": "pipeline-grpo-step-1234",
         "uid": "9a7e0b2c-0000-4000-8000-000000000001"}]
    kubernetes_validate.validate(fake.created, "1.29.0", strict=True)
    monkeypatch.delenv("KFP_POD_UID")
    assert launch.step_pod_owner(NS) is None


def test_the_launcher_needs_only_what_its_role_grants(cluster):
    fake, client = cluster
    _launch(client, [])
    role, _ = rbac_manifests(NS)
    granted = {(r, v) for rule in role["rules"] for r in rule["resources"] for v in rule["verbs"]}
    assert {(resource, verb) for verb, resource, _ in fake.calls} <= granted


@pytest.mark.parametrize("cluster", [{"exit_code": 1}], indirect=True)
def test_a_failed_job_raises_with_the_reason_and_the_log_tail_and_is_deleted(cluster):
    fake, client = cluster
    logged: list[str] = []
    with pytest.raises(JobFailed) as failed:
        _launch(client, logged)
    message = str(failed.value)
    assert f"{NS}/{NAME} failed: BackoffLimitExceeded" in message
    assert "container trainer exited with code 1 (Error)" in message
    assert message.endswith("\n".join(LINES)) and "lines of trainer" in message
    assert _trainer_lines(logged) == list(LINES)
    assert _deleted(fake) == [f"{NAME} Foreground"]


@pytest.mark.parametrize("cluster", [{"existing": True, "pod_after": 2}], indirect=True)
def test_a_job_left_by_an_earlier_try_is_replaced(cluster):
    fake, client = cluster
    logged: list[str] = []
    assert _launch(client, logged)["succeeded"]
    creates = [c for c in fake.calls if c[0] == "create"]
    assert len(creates) == 2  # refused (409), then created once the old Job had gone
    # Foreground: the old Job is listed until its pod has gone, and the new one waits for that
    assert _deleted(fake) == [f"{NAME} Foreground", f"{NAME} Foreground"]
    first_delete = fake.calls.index(("delete", "jobs", f"{NAME} Foreground"))
    assert fake.calls[first_delete + 1:].index(creates[1]) == fake.script.delete_reads
    # The old Job's finished pod was still listed: only the new Job's pod was followed.
    assert "the old run's log" not in logged and _trainer_lines(logged) == list(LINES)


@pytest.mark.parametrize("cluster", [{"hang": True}], indirect=True)
@pytest.mark.slow
def test_a_timeout_raises_and_deletes_the_job_even_while_following_the_log(cluster):
    fake, client = cluster
    logged: list[str] = []
    start = time.monotonic()
    with pytest.raises(LaunchError, match=r"did not finish within 2\.5 s") as raised:
        _launch(client, logged, timeout_s=2.5)  # room for a busy CI machine to show the lines
    assert not isinstance(raised.value, JobFailed)
    assert time.monotonic() - start < 5  # the hanging stream did not hold it past its deadline
    assert _trainer_lines(logged) == list(LINES)  # the lines before the hang were shown
    assert _deleted(fake) == [f"{NAME} Foreground"]
    assert fake.created["spec"]["activeDeadlineSeconds"] == 3  # the cluster ends it too


@pytest.mark.parametrize("cluster", [
    {"crashed": {"sglang": (1, ("loading /shared/initial",
                                "torch.OutOfMemoryError: CUDA out of memory"))}},
    {"waiting": {"sglang": ("ImagePullBackOff", 'Back-off pulling image "lmsysorg/sglang:nope"')}},
    {"waiting": {"trainer": ("ImagePullBackOff", "manifest unknown")}},
], indirect=True, ids=["sidecar-crash", "sidecar-image", "trainer-image"])
def test_a_pod_that_cannot_start_is_reported_by_container(cluster):
    fake, client = cluster
    with pytest.raises(JobFailed) as failed:
        _launch(client, [], timeout_s=5)
    message = str(failed.value)
    assert message.startswith(f"Job {NS}/{NAME} cannot start: container ")
    if fake.script.crashed:
        assert "container sglang is in CrashLoopBackOff" in message
        assert "container sglang exited with code 1 (Error)" in message
        assert message.endswith("--- last 2 lines of sglang ---\nloading /shared/initial\n"
                                "torch.OutOfMemoryError: CUDA out of memory")
    else:
        [(container, (reason, why))] = fake.script.waiting.items()
        assert f"container {container} is in {reason}: {why}" in message
    assert _deleted(fake) == [f"{NAME} Foreground"]


@pytest.mark.parametrize("cluster", [
    {"unschedulable": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}], indirect=True)
def test_a_pod_unschedulable_past_the_grace_period_fails(cluster):
    fake, client = cluster
    start = time.monotonic()
    with pytest.raises(JobFailed, match=r"cannot be scheduled \(Unschedulable for \d+ s\): "
                                        r"0/3 nodes are available: 3 Insufficient nvidia\.com/gpu"):
        _launch(client, [], pending_grace_s=0.2)
    assert 0.2 <= time.monotonic() - start < 10  # failed on the grace period, not later
    assert _deleted(fake) == [f"{NAME} Foreground"]


@pytest.mark.parametrize("cluster", [{"waiting": {"trainer": ("ErrImagePull", "429 Too Many")}}],
                         indirect=True)
def test_a_first_failed_image_pull_is_waited_for(cluster):
    """kubelet retries a pull (a registry's rate limit passes); only ImagePullBackOff is stuck."""
    fake, client = cluster
    logged: list[str] = []
    with pytest.raises(LaunchError, match="did not finish within") as raised:
        _launch(client, logged, timeout_s=0.5)
    assert not isinstance(raised.value, JobFailed)
    assert any(x.startswith("launcher: pod ") for x in logged)  # it saw the pull failing


@pytest.mark.parametrize("cluster", [
    {"refused": 'pods "grpo-run-1-x" is forbidden: exceeded quota: gpus, requested: '
                'requests.nvidia.com/gpu=2, limited: requests.nvidia.com/gpu=1'}], indirect=True)
def test_a_job_that_makes_no_pod_fails_with_the_reason_from_its_events(cluster):
    fake, client = cluster
    with pytest.raises(JobFailed, match=r"has made no pod in \d+ s: FailedCreate: pods .* is "
                                        r"forbidden: exceeded quota: gpus"):
        _launch(client, [], pending_grace_s=0.2)
    assert _deleted(fake) == [f"{NAME} Foreground"]


@pytest.mark.parametrize("cluster", [{"suspended": True}], indirect=True)
def test_a_job_held_by_a_queue_is_waited_for_not_failed(cluster):
    fake, client = cluster
    with pytest.raises(LaunchError, match="did not finish within") as raised:
        _launch(client, [], pending_grace_s=0.05, timeout_s=0.5)
    assert not isinstance(raised.value, JobFailed)


@pytest.mark.parametrize("cluster", [{"deleted_at": 3}], indirect=True)
def test_a_job_someone_else_is_deleting_ends_the_launch_with_that_reason(cluster):
    fake, client = cluster
    with pytest.raises(LaunchError, match="is being deleted"):
        _launch(client, [], timeout_s=5)


@pytest.mark.parametrize("cluster", [{"read_errors": {2: 503, 3: 500, 5: 429}}], indirect=True)
def test_a_briefly_unavailable_api_server_does_not_end_the_run(cluster):
    fake, client = cluster
    logged: list[str] = []
    assert _launch(client, logged)["succeeded"]
    assert _trainer_lines(logged) == list(LINES)
    assert sum("the API server failed a read (HTTP 503" in x for x in logged) == 1


@pytest.mark.parametrize("cluster", [{"read_errors": {2: 404}}], indirect=True)
def test_a_job_deleted_by_someone_else_ends_the_launch_with_that_reason(cluster):
    fake, client = cluster
    with pytest.raises(LaunchError, match="was deleted while it ran"):
        _launch(client, [], timeout_s=5)


@pytest.mark.parametrize("cluster", [{"hang": True}], indirect=True)
@pytest.mark.slow
def test_a_silent_log_stream_is_opened_again_without_repeats(cluster, monkeypatch):
    """A stream with nothing to read for FOLLOW_READ_S may be a dead connection: follow anew."""
    fake, client = cluster
    monkeypatch.setattr(launch, "FOLLOW_READ_S", 0.2)
    logged: list[str] = []
    with pytest.raises(LaunchError, match="did not finish within"):
        _launch(client, logged, timeout_s=2.0)
    assert fake.follows >= 2
    assert _trainer_lines(logged) == list(LINES)
    assert not any("ended early" in x for x in logged)  # silence is not news


@pytest.mark.parametrize("cluster", [{"drop_after": 2}], indirect=True)
def test_a_log_stream_that_ends_early_is_followed_again_without_repeats(cluster):
    fake, client = cluster
    logged: list[str] = []
    assert _launch(client, logged)["succeeded"]
    assert fake.follows == 2
    assert _trainer_lines(logged) == list(LINES)
    assert "launcher: the trainer's log stream ended early; following it again" in logged


def test_keep_leaves_the_job(cluster):
    fake, client = cluster
    assert _launch(client, [], keep=True)["succeeded"]
    assert _deleted(fake) == []


@pytest.mark.parametrize("interrupt", ["keyboard", "sigterm"])
def test_an_interrupted_launch_still_deletes_the_job(cluster, interrupt):
    fake, client = cluster

    def log(line: str) -> None:
        if line == LINES[0]:
            if interrupt == "keyboard":
                raise KeyboardInterrupt
            signal.raise_signal(signal.SIGTERM)

    def guard(signum, frame):  # only reached if the launcher did not handle SIGTERM itself
        raise AssertionError("SIGTERM reached the test's own handler")

    previous = signal.signal(signal.SIGTERM, guard)
    try:
        with pytest.raises(KeyboardInterrupt if interrupt == "keyboard" else SystemExit):
            launch_job(_manifest(), poll_s=0.02, log=log, api_client=client)
        assert signal.getsignal(signal.SIGTERM) is guard  # the launcher put the handler back
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert _deleted(fake) == [f"{NAME} Foreground"]


# --- a TrainJob (SFT beyond one node), through the same launcher -------------------------
def _trainjob() -> dict:
    return trainjob(TrainJobSpec(name=NAME, namespace=NS, data_uri="s3://apr-models/d",
                                 out_uri="s3://apr-models/o", preset="paper"))


@pytest.mark.parametrize("cluster", [{"kind": "TrainJob"}], indirect=True)
def test_a_trainjob_streams_node_0s_log_and_is_deleted(cluster):
    fake, client = cluster
    logged: list[str] = []
    summary = launch_job(_trainjob(), poll_s=0.02, log=logged.append, api_client=client,
                         timeout_s=60)
    assert summary["succeeded"] is True
    assert _trainer_lines(logged) == list(LINES)
    assert f"launcher: created TrainJob {NS}/{NAME}" in logged
    assert fake.created["spec"]["activeDeadlineSeconds"] == 60  # the cluster ends it too
    assert _deleted(fake) == [f"{NAME} Foreground"] and fake.calls[-1][:2] == ("delete", "trainjobs")
    role, _ = rbac_manifests(NS)  # the Role grants what the launcher called
    granted = {(r, v) for rule in role["rules"] for r in rule["resources"] for v in rule["verbs"]}
    assert {(resource, verb) for verb, resource, _ in fake.calls} <= granted


@pytest.mark.parametrize("cluster", [{"kind": "TrainJob", "exit_code": 1}], indirect=True)
def test_a_failed_trainjob_raises_with_node_0s_log_tail(cluster):
    fake, client = cluster
    with pytest.raises(JobFailed) as failed:
        launch_job(_trainjob(), poll_s=0.02, log=[].append, api_client=client)
    message = str(failed.value)
    assert message.startswith(f"TrainJob {NS}/{NAME} failed: ")
    assert "container node exited with code 1 (Error)" in message
    assert message.endswith("\n".join(LINES))
    assert _deleted(fake) == [f"{NAME} Foreground"]


@pytest.mark.parametrize("cluster", [{"kind": "TrainJob", "existing": True}], indirect=True)
def test_a_trainjob_left_by_an_earlier_try_is_replaced(cluster):
    fake, client = cluster
    logged: list[str] = []
    assert launch_job(_trainjob(), poll_s=0.02, log=logged.append, api_client=client)["succeeded"]
    assert [c[1] for c in fake.calls if c[0] == "create"] == ["trainjobs", "trainjobs"]
    assert "the old run's log" not in logged and _trainer_lines(logged) == list(LINES)


@pytest.mark.parametrize("cluster", [{"kind": "TrainJob"}], indirect=True)
def test_run_sft_trainjob_stages_the_data_runs_it_and_brings_the_model_back(
        cluster, s3, monkeypatch, tmp_path):
    """The pipeline step's side of a multi-node SFT, against the fake API server and a real
    S3 server; node 0 is played by the test, which publishes the result while its log is
    streamed (as `apr sft-node` does)."""
    from test_trainjob import check

    from apr.cluster import trainjob as trainjob_launch
    from apr.train.checkpoints import MIRROR_SLOTS

    fake, client = cluster
    data = tmp_path / "data"
    (data / "problems").mkdir(parents=True)
    (data / "problems" / "train.jsonl").write_text('{"nums": [1, 2, 3], "target": 6}\n')
    result = tmp_path / "result"
    (result / "model").mkdir(parents=True)
    (result / "model" / "model.safetensors").write_bytes(b"sft weights")
    (result / "sft.json").write_text('{"steps": 7}')
    base = f"s3://apr-sft-store/pipeline/sft-jobs/{NAME}"  # not the GRPO test's bucket, which it lists
    monkeypatch.setattr(trainjob_launch, "launch_job", lambda manifest, **kwargs: launch.launch_job(
        manifest, poll_s=0.02, api_client=client, **kwargs))

    def node_0_runs(line: str) -> None:
        if line == LINES[0]:  # running: its data is in the store; it checkpoints, then ends
            seen = storage.download(f"{base}/data", tmp_path / "seen", s3)
            assert _files(seen) == _files(data)
            for slot in MIRROR_SLOTS:
                storage.upload(result / "model", f"{base}/checkpoints/{slot}", s3)
            storage.upload(result, f"{base}/result", s3)

    fields = {"name": NAME, "namespace": NS, "preset": "paper", "overrides": ("traces=apr",),
              "nodes": 4, "gpus_per_node": 8, "image": "example/apr-train:1",
              "s3_endpoint": "http://minio.kubeflow:9000"}
    out = trainjob_launch.run_sft_trainjob(fields, str(data), "s3://apr-sft-store/pipeline",
                                           str(tmp_path / "out"), settings=s3, log=node_0_runs)
    assert _files(out) == _files(result)
    check(fake.created)
    trainer = fake.created["spec"]["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"], trainer["image"]) == (
        4, 8, "example/apr-train:1")
    args = trainer["args"]
    assert (args[args.index("--data") + 1], args[args.index("--out") + 1]) == (f"{base}/data", base)
    # the staged data and the checkpoints are gone once the model is out; the result stays
    for gone in ("data", *(f"checkpoints/{slot}" for slot in MIRROR_SLOTS)):
        assert not storage.is_complete(f"{base}/{gone}", s3)
    assert storage.is_complete(f"{base}/result", s3)


def test_only_jobs_and_trainjobs_are_launched():
    with pytest.raises(LaunchError, match="cannot launch a 'Deployment'"):
        launch_job({"kind": "Deployment", "metadata": {"name": "x"}}, api_client=object())


def _files(directory) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != storage.MANIFEST}


@pytest.mark.slow
def test_run_grpo_job_stages_the_inputs_runs_the_job_and_brings_the_model_back(
        cluster, s3, monkeypatch, tmp_path):
    """The pipeline step's side of a GRPO Job, against the fake API server and a real S3
    server; the trainer is played by the test, which publishes the run's outputs while the
    Job's log is streamed (as `apr grpo --out s3://...` would)."""
    fake, client = cluster
    sft = tmp_path / "sft"
    sft.mkdir()
    (sft / "config.json").write_text('{"model_type": "llama"}')
    (sft / "model.safetensors").write_bytes(b"sft weights")
    data = tmp_path / "data"
    (data / "problems").mkdir(parents=True)
    (data / "problems" / "train.jsonl").write_text('{"nums": [1, 2, 3], "target": 6}\n')
    (data / "problems" / "val.jsonl").write_text('{"nums": [2, 2, 2], "target": 8}\n')
    (data / "apr").mkdir()
    (data / "apr" / "train-00000.npz").write_bytes(b"traces the trainer does not need")
    trained = tmp_path / "trained"
    trained.mkdir()
    (trained / "config.json").write_text('{"model_type": "llama"}')
    (trained / "model.safetensors").write_bytes(b"grpo weights")
    summary = {"steps": 3, "initial_val_accuracy": 0.25, "val_accuracy": 0.5}
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "grpo.json").write_text(json.dumps(summary))
    (logs / "metrics.jsonl").write_text('{"step": 1, "reward": 0.5}\n')
    store = "s3://apr-store/pipeline/"
    base = f"s3://apr-store/pipeline/grpo-runs/{NAME}"

    launched = []

    def launch_here(manifest, **kwargs):  # the real launcher, on the fake cluster, polling fast
        launched.append(kwargs)
        return launch.launch_job(manifest, poll_s=0.02, api_client=client, **kwargs)

    monkeypatch.setattr(grpo_launch, "launch_job", launch_here)
    logged: list[str] = []

    def trainer_runs(line: str) -> None:
        logged.append(line)
        if line == LINES[0]:  # the Job is running: what it was given is in the store
            assert _files(storage.download(f"{base}/initial", tmp_path / "seen" / "initial",
                                           s3)) == _files(sft)
            assert _files(storage.download(f"{base}/problems", tmp_path / "seen" / "problems",
                                           s3)) == {f"problems/{split}.jsonl": (
                data / "problems" / f"{split}.jsonl").read_bytes() for split in ("train", "val")}
            assert not storage.is_complete(f"{base}/run/model", s3)
            storage.upload(trained, f"{base}/run/model", s3)
            storage.upload(logs, f"{base}/run/logs", s3)

    fields = {"name": NAME, "namespace": NS, "trainer_image": "example/apr-train:1",
              "sglang_image": "example/sglang:1", "s3_endpoint": "http://minio.kubeflow:9000"}
    out = tmp_path / "out" / "model"
    result = grpo_launch.run_grpo_job(fields, str(sft), str(data), store,
                                      ["--config", "gpu-small", "--set", "steps=3"], str(out),
                                      settings=s3, timeout_s=60, log=trainer_runs)
    assert result == summary
    assert _files(out) == _files(trained)  # the trained model, not the SFT one
    assert _trainer_lines(logged) == list(LINES)
    [kwargs] = launched  # one Job, with the step's timeout and log
    assert kwargs["timeout_s"] == 60 and kwargs["log"] is trainer_runs

    job = fake.created
    assert job["metadata"]["name"] == NAME and job["metadata"]["namespace"] == NS
    kubernetes_validate.validate(job, "1.29.0", strict=True)
    pod = job["spec"]["template"]["spec"]
    [trainer] = pod["containers"]
    assert trainer["image"] == "example/apr-train:1"
    assert trainer["command"][:2] == ["apr", "grpo"]
    args = trainer["command"][2:]
    assert args[args.index("--model") + 1] == "/shared/initial"
    assert args[args.index("--problems") + 1] == f"{base}/problems"
    assert args[args.index("--out") + 1] == f"{base}/run"
    assert "--resume" in args and "--no-progress" in args
    assert args[-4:] == ["--config", "gpu-small", "--set", "steps=3"]
    assert {"name": "S3_ENDPOINT", "value": "http://minio.kubeflow:9000"} in trainer["env"]
    pull, sidecar = pod["initContainers"]
    assert pull["command"] == ["apr", "pull", "--uri", f"{base}/initial", "--out",
                               "/shared/initial"]
    assert sidecar["image"] == "example/sglang:1"
    assert _deleted(fake) == [f"{NAME} Foreground"]
    # staging and checkpoints are cleaned once the model is out; the model and logs stay
    for gone in ("initial", "problems"):
        assert not storage.is_complete(f"{base}/{gone}", s3)
    listed = {o.object_name for o in s3.client().list_objects("apr-store", recursive=True)}
    assert listed and all(name.startswith(f"pipeline/grpo-runs/{NAME}/run/") for name in listed)
    assert storage.is_complete(f"{base}/run/model", s3) and storage.is_complete(f"{base}/run/logs", s3)


@pytest.mark.slow
@pytest.mark.sglang
def test_the_grpo_job_runs_here_for_real(api_server, s3, tmp_path, monkeypatch):
    """The GRPO step's Job, launched by the real launcher against the fake API server, whose
    pod runs here (the pod runner): the init container pulls the SFT model from the S3
    server, SGLang starts as a native sidecar in the training image (its `python3`: the SGLang
    environment, CPU flags appended) and passes its startup probe, the trainer runs two steps syncing its weights
    into SGLang through the shared volume, and the trained model comes back."""
    import socket
    import sys

    from conftest import S3_KEYS, make_dataset, sglang_python_or_skip
    from pod_runner import Image

    from apr import model as model_lib
    from apr.cluster.defaults import S3_SECRET
    from apr.decode.rollout_server import sglang_cpu_args

    python = sglang_python_or_skip()
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", grpo_launch.SGLANG_PORT)) == 0:
            pytest.skip(f"port {grpo_launch.SGLANG_PORT} is taken here")
    data = make_dataset(tmp_path / "data", train=4, val=2, seed=0, chunk=2, n_numbers=2)
    sft = model_lib.save(model_lib.build("tiny", seed=0), tmp_path / "sft")
    here = Path(sys.executable).parent

    def images(reference: str) -> Image:  # the training image holds apr and SGLang
        assert reference.rsplit(":", 1)[0].endswith("apr-on-kubernetes/apr-train"), reference
        return Image({"apr": str(here / "apr"), "python3": python},
                     {"python3": tuple(sglang_cpu_args())})

    secrets = {(S3_SECRET, "accesskey"): S3_KEYS["AWS_ACCESS_KEY_ID"],
               (S3_SECRET, "secretkey"): S3_KEYS["AWS_SECRET_ACCESS_KEY"]}
    current, client = api_server
    fake = current["cluster"] = FakeCluster(Script(
        live=lambda spec: PodRunner(spec, images, tmp_path / "pod", secrets, poll_s=0.5)))
    monkeypatch.setattr(grpo_launch, "launch_job", lambda manifest, **kwargs: launch.launch_job(
        manifest, poll_s=0.2, api_client=client, **kwargs))
    logged: list[str] = []
    args = ["--config", "local", "--set", "steps=2", "--set", "group_size=2",
            "--set", "prompts_per_step=2", "--set", "context=96", "--set", "tokens_per_batch=2048",
            "--set", "val_problems=2", "--set", "checkpoint_every=1"]
    try:
        summary = grpo_launch.run_grpo_job(
            {"name": NAME, "namespace": NS, "s3_endpoint": s3.url}, str(sft), str(data),
            "s3://apr-live/pipeline", args, str(tmp_path / "out"), settings=s3, timeout_s=600,
            log=logged.append)
    finally:
        if fake.pod is not None:
            fake.pod.stop()
    assert summary["steps"] == 2, logged[-20:]
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert fake.pod.state("pull-model") == ("terminated", 0)
    assert "sglang" in fake.pod.started and fake.pod.state("trainer") == ("terminated", 0)
    assert any("step" in line for line in _trainer_lines(logged))  # the step's log is its
    # each step rolled out on SGLang holding that step's weights, sent through the volume
    logs = storage.download("s3://apr-live/pipeline/grpo-runs/grpo-run-1/run/logs",
                            tmp_path / "logs", s3)
    rollouts = [json.loads(line) for line in (logs / "rollouts.jsonl").read_text().splitlines()]
    assert sorted({(r["step"], r["weight_version"]) for r in rollouts}) == [(0, "0"), (1, "1")]
    assert "update_weights_from_disk" in fake.pod.log("sglang", lines=10**6)


def test_rbac_lets_the_pipeline_runner_launch_jobs():
    role, binding = rbac_manifests("kubeflow")
    for obj in (role, binding):
        kubernetes_validate.validate(obj, "1.29.0", strict=True)
    rules = {(group, resource): set(rule["verbs"]) for rule in role["rules"]
             for group in rule["apiGroups"] for resource in rule["resources"]}
    assert rules == {("batch", "jobs"): {"create", "get", "list", "watch", "delete"},
                     ("trainer.kubeflow.org", "trainjobs"): {"create", "get", "list", "watch",
                                                             "delete"},
                     ("", "pods"): {"get", "list", "watch"}, ("", "pods/log"): {"get"},
                     ("", "events"): {"list"}}
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "pipeline-runner", "namespace": "kubeflow"}]
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == "kubeflow"


def test_kube_config_prefers_the_cluster_and_says_what_to_fix_without_one(monkeypatch):
    from kubernetes import config

    calls = []
    monkeypatch.setattr(config, "load_incluster_config", lambda: calls.append("in-cluster"))
    monkeypatch.setattr(config, "load_kube_config", lambda: calls.append("kubeconfig"))
    launch.load_kube_config()
    assert calls == ["in-cluster"]

    def no_cluster():
        raise config.ConfigException("Service host/port is not set.")

    monkeypatch.setattr(config, "load_incluster_config", no_cluster)
    launch.load_kube_config()
    assert calls == ["in-cluster", "kubeconfig"]

    def no_file():
        raise config.ConfigException("Invalid kube-config file. No configuration found.")

    monkeypatch.setattr(config, "load_kube_config", no_file)
    with pytest.raises(LaunchError, match="not inside a cluster .*Service host/port.*KUBECONFIG"):
        launch.load_kube_config()

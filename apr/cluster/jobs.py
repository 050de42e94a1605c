"""Run a Kubernetes Job, or a Kubeflow Trainer TrainJob, from a pipeline step and see it through.

`launch_job` creates it (inside the cluster, under a ServiceAccount that `apr.cluster.rbac`
grants them to), streams the trainer's log into the step's log, turns a failed, stuck or
overdue run into an exception that says why, and deletes it when it returns or raises. The
two kinds differ only in how they are created, read and deleted, and where their trainer
runs (`_Kind`): a Job's own pod, container `trainer`; a TrainJob's node 0 (its JobSet's pod
of completion index 0), container `node`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import time
from collections import deque
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

from apr.shutdown import sigterm_as_exit

TRAINER = "trainer"  # a Job's container whose log becomes the step's log
TAIL_LINES = 50  # log lines quoted when a Job fails
# Waiting reasons that do not clear by themselves: fail now rather than at the timeout.
# (ErrImagePull is not one: kubelet retries a pull, and a registry's rate limit passes.)
STUCK_REASONS = frozenset({"ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError",
                           "CrashLoopBackOff"})
GONE_WAIT_S = 120.0  # how long a deleted Job of the same name may take to disappear
API_RETRY_S = 300.0  # how long the API server may answer 5xx / 429 or not at all, mid-watch
FOLLOW_READ_S = 300.0  # a log stream silent this long is opened again (a half-open connection)
REQUEST_TIMEOUT = (30.0, 60.0)  # connect, read: every call but the log stream
print_now = functools.partial(print, flush=True)  # a pod's stdout is a pipe: no buffering
BY_SOMEONE_ELSE = "by someone else: kubectl delete, or a namespace clean-up"
# Where a pod reads its own namespace; KFP's executor pods carry their own name and UID in
# KFP_POD_NAME and KFP_POD_UID (from the downward API).
POD_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


class LaunchError(RuntimeError):
    """The Job could not be created, or was not seen through to its end."""


class JobFailed(LaunchError):
    """The Job failed, or its pod cannot start: the message names the container and quotes its log."""


def load_kube_config() -> None:
    """Points the `kubernetes` client at the cluster: the pod's ServiceAccount, else a kubeconfig."""
    from kubernetes import config

    try:
        config.load_incluster_config()
        return
    except config.ConfigException as e:
        in_cluster = e
    try:
        config.load_kube_config()
    except (config.ConfigException, OSError) as e:
        raise LaunchError(
            f"no Kubernetes credentials: not inside a cluster ({in_cluster}) and no usable "
            f"kubeconfig ({e}); run in a pod with a ServiceAccount, or set KUBECONFIG") from e


def job_name(run_id: str, prefix: str = "apr-grpo") -> str:
    """A valid Job name that is the same for every retry of one pipeline run (so a retried
    step replaces its Job and the trainer resumes from that run's checkpoint)."""
    return f"{prefix}-{hashlib.sha256(run_id.encode()).hexdigest()[:12]}"


def step_pod_owner(namespace: str) -> dict | None:
    """The pod this step runs in, as an owner reference for a Job in `namespace`, else None.

    With it, a Job outlives its step by no more than the garbage collector's delay when the
    launcher cannot delete it itself (SIGKILL, a lost node, a deleted run). Only in the pod's
    own namespace: an owner in another one counts as missing, and the Job would be deleted
    at once. No blockOwnerDeletion, so the Role needs nothing more.
    """
    name, uid = os.environ.get("KFP_POD_NAME"), os.environ.get("KFP_POD_UID")
    try:
        with open(POD_NAMESPACE_FILE) as f:
            own_namespace = f.read().strip()
    except OSError:
        return None  # not in a pod
    if not (name and uid) or own_namespace != namespace:
        return None
    return {"apiVersion": "v1", "kind": "Pod", "name": name, "uid": uid}


def launch_job(manifest: dict, *, timeout_s: float = 0, poll_s: float = 5.0,
               log: Callable[[str], Any] = print_now, keep: bool = False, api_client: Any = None,
               pending_grace_s: float = 600.0) -> dict:
    """Runs the Job to its end with the trainer's log streamed to `log`; returns a summary.

    Raises JobFailed when the Job fails or its pod cannot start (a bad image, a crashing
    sidecar, no node or no pod for longer than `pending_grace_s`), LaunchError past
    `timeout_s` (0: no limit; else also the Job's activeDeadlineSeconds, so the cluster ends
    it even if this process is killed). The Job is deleted however this returns, SIGTERM
    included, unless `keep`: a GPU Job must not outlive the step that waits for it. Run from a
    KFP step, the step's pod also owns the Job (`step_pod_owner`), for when this process
    cannot delete it. `api_client`: by default the cluster's own.
    """
    from kubernetes import client

    owns_client = api_client is None
    if owns_client:
        load_kube_config()
        settings = client.Configuration.get_default_copy()
        settings.retries = False  # urllib3 would retry a timed-out read 3 times, unseen
        api_client = client.ApiClient(settings)
    kind = _Kind.of(manifest, api_client)
    core = client.CoreV1Api(api_client)
    name = manifest["metadata"]["name"]
    namespace = manifest["metadata"].get("namespace", "default")
    what = f"{kind.name} {namespace}/{name}"
    deadline = _Deadline(what, timeout_s)
    if timeout_s > 0:
        manifest = {**manifest, "spec": {**manifest["spec"],
                                         "activeDeadlineSeconds": math.ceil(timeout_s)}}
    owner = None if keep else step_pod_owner(namespace)
    if owner is not None:
        metadata = manifest["metadata"]
        owners = [*metadata.get("ownerReferences", []), owner]
        manifest = {**manifest, "metadata": {**metadata, "ownerReferences": owners}}
    # A client made here is closed at the end: its connection pool's threads would outlive
    # the step. The Job's deletion (the finally below) runs before that.
    with sigterm_as_exit(), (api_client if owns_client else nullcontext()):
        try:  # the finally deletes even after a failed create: an interrupted one may have made it
            uid = _create(kind, manifest, deadline, poll_s, log)
            log(f"launcher: created {what}")
            _Watch(kind, core, name, namespace, uid, log, deadline, poll_s, pending_grace_s).run()
            seconds = round(time.monotonic() - deadline.start, 1)
            log(f"launcher: {what} succeeded after {seconds:g} s")
            return {"name": name, "namespace": namespace, "seconds": seconds, "succeeded": True}
        finally:
            if not keep:
                _delete(kind, name, namespace, log)


@dataclass
class _Deadline:
    """`timeout_s` (0: none) counted from now."""

    what: str
    timeout_s: float
    start: float = field(default_factory=time.monotonic)

    def left(self) -> float | None:
        return None if self.timeout_s <= 0 else self.start + self.timeout_s - time.monotonic()

    def check(self) -> None:
        left = self.left()
        if left is not None and left <= 0:
            raise LaunchError(f"{self.what} did not finish within {self.timeout_s:g} s")


def _api_error(what: str, error: Any) -> LaunchError:
    """An ApiException as one line, with what to fix when it is a permission."""
    try:
        detail = json.loads(error.body)["message"]
    except (TypeError, ValueError, KeyError):
        detail = error.body
    hint = " (does the step's ServiceAccount have the Role from apr pipeline rbac?)" \
        if error.status == 403 else ""
    return LaunchError(f"{what}: HTTP {error.status} {error.reason}: {detail}{hint}")


@dataclass(frozen=True)
class _State:
    """What the watch needs of one read of the Job or TrainJob."""

    deleting: bool
    suspended: bool
    outcome: tuple[bool, str] | None  # (succeeded, why) once finished


class _Kind:
    """A batch/v1 Job: created, read and deleted through BatchV1Api; its own pod runs the
    trainer."""

    name = "Job"
    container = TRAINER

    def __init__(self, api_client: Any):
        from kubernetes import client

        self.api = client.BatchV1Api(api_client)

    @staticmethod
    def of(manifest: dict, api_client: Any) -> "_Kind":
        kinds = {"Job": _Kind, "TrainJob": _TrainJobKind}
        if manifest.get("kind") not in kinds:
            raise LaunchError(f"cannot launch a {manifest.get('kind')!r}: only {sorted(kinds)}")
        return kinds[manifest["kind"]](api_client)

    def create(self, namespace: str, manifest: dict) -> str:
        """Creates it; returns its uid."""
        created = self.api.create_namespaced_job(namespace, manifest,
                                                 _request_timeout=REQUEST_TIMEOUT)
        return created.metadata.uid

    def read(self, name: str, namespace: str, **kwargs: Any) -> _State:
        job = self.api.read_namespaced_job(name, namespace, **kwargs)
        return _State(job.metadata.deletion_timestamp is not None,
                      bool(job.spec and job.spec.suspend), _outcome(job))

    def delete(self, name: str, namespace: str) -> None:
        # Foreground: it stays listed until its pods have gone (see _delete).
        self.api.delete_namespaced_job(name, namespace, propagation_policy="Foreground",
                                       _request_timeout=REQUEST_TIMEOUT)

    def pod_selector(self, name: str) -> str:
        return f"job-name={name}"

    def owns(self, pod: Any, uid: str) -> bool:
        """An earlier Job of the same name may still have pods going."""
        return any(o.uid == uid for o in pod.metadata.owner_references or [])


class _TrainJobKind(_Kind):
    """A Kubeflow Trainer TrainJob: a custom object; its JobSet's pods carry the JobSet's
    labels (named after the TrainJob), and node 0 (completion index 0) logs the run."""

    name = "TrainJob"
    container = "node"  # the torch runtime's trainer container
    group, version, plural = "trainer.kubeflow.org", "v1alpha1", "trainjobs"

    def __init__(self, api_client: Any):
        from kubernetes import client

        self.api = client.CustomObjectsApi(api_client)

    def create(self, namespace: str, manifest: dict) -> str:
        created = self.api.create_namespaced_custom_object(
            self.group, self.version, namespace, self.plural, manifest,
            _request_timeout=REQUEST_TIMEOUT)
        return created["metadata"]["uid"]

    def read(self, name: str, namespace: str, **kwargs: Any) -> _State:
        job = self.api.get_namespaced_custom_object(self.group, self.version, namespace,
                                                    self.plural, name, **kwargs)
        outcome = None
        for c in job.get("status", {}).get("conditions") or []:
            if c.get("status") == "True" and c.get("type") in ("Complete", "Failed"):
                why = ": ".join(x for x in (c.get("reason"), c.get("message")) if x)
                outcome = c["type"] == "Complete", why
        return _State("deletionTimestamp" in job["metadata"],
                      bool(job.get("spec", {}).get("suspend")), outcome)

    def delete(self, name: str, namespace: str) -> None:
        self.api.delete_namespaced_custom_object(
            self.group, self.version, namespace, self.plural, name,
            propagation_policy="Foreground", _request_timeout=REQUEST_TIMEOUT)

    def pod_selector(self, name: str) -> str:
        return f"jobset.sigs.k8s.io/jobset-name={name},batch.kubernetes.io/job-completion-index=0"

    def owns(self, pod: Any, uid: str) -> bool:
        return True  # owned by the JobSet's Jobs; an earlier TrainJob's are gone (Foreground)


def _create(kind: _Kind, manifest: dict, deadline: _Deadline, poll_s: float, log: Callable) -> str:
    """Creates it; one of the same name (a retried step) is deleted first. Returns its uid.

    The trainer resumes from its own checkpoint, so the new one loses nothing of the old one.
    """
    from kubernetes.client.exceptions import ApiException

    name, namespace = manifest["metadata"]["name"], manifest["metadata"].get("namespace", "default")
    what = f"{kind.name} {namespace}/{name}"
    try:
        try:
            return kind.create(namespace, manifest)
        except ApiException as e:
            if e.status != 409:
                raise
        log(f"launcher: {what} already exists (a retried step?): replacing it")
        kind.delete(name, namespace)
        gone = _Deadline(f"deleting the earlier {what}", GONE_WAIT_S)
        while _exists(kind, name, namespace):
            deadline.check()
            gone.check()
            time.sleep(poll_s)
        return kind.create(namespace, manifest)
    except ApiException as e:
        raise _api_error(f"cannot create {what}", e) from e


def _exists(kind: _Kind, name: str, namespace: str) -> bool:
    from kubernetes.client.exceptions import ApiException

    try:
        kind.read(name, namespace, _request_timeout=REQUEST_TIMEOUT)
        return True
    except ApiException as e:
        if e.status == 404:
            return False
        raise


def _delete(kind: _Kind, name: str, namespace: str, log: Callable) -> None:
    """Deletes it and its pods; a failure is logged, not raised, so it cannot hide why the
    run ended (a finished Job still goes after ttlSecondsAfterFinished).

    Foreground: it stays listed until its pods have gone, so a retried step (same name)
    waits for it and never shares GPUs or checkpoint slots with a trainer still stopping.
    """
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    what = f"{kind.name} {namespace}/{name}"
    try:
        kind.delete(name, namespace)
        log(f"launcher: deleted {what}")
    except ApiException as e:
        if e.status != 404:
            log(f"launcher: could not delete {what}: HTTP {e.status} {e.reason}")
    except HTTPError as e:
        log(f"launcher: could not delete {what}: {e}")


def _statuses(pod: Any) -> list:
    return [*(pod.status.init_container_statuses or []), *(pod.status.container_statuses or [])]


def _status(pod: Any, container: str) -> Any:
    return next((s for s in _statuses(pod) if s.name == container), None)


def _started(pod: Any, container: str) -> bool:
    status = _status(pod, container)
    return status is not None and bool(status.state.running or status.state.terminated)


def _terminated(pod: Any, container: str) -> bool:
    status = _status(pod, container)
    return status is not None and bool(status.state.terminated)


def _failure(status: Any) -> tuple[Any, bool]:
    """(terminated state, whether it is the previous run) of a container that exited with an error."""
    for ended, previous in ((status.state.terminated, False),
                            (status.last_state and status.last_state.terminated, True)):
        if ended and ended.exit_code != 0:
            return ended, previous
    return None, False


def _outcome(job: Any) -> tuple[bool, str] | None:
    """(succeeded, why) once the Job has finished, else None."""
    status = job.status
    if status is None:
        return None
    for c in status.conditions or []:
        if c.status == "True" and c.type in ("Complete", "Failed"):
            return c.type == "Complete", ": ".join(x for x in (c.reason, c.message) if x)
    if status.succeeded:
        return True, ""
    limit = job.spec.backoff_limit if job.spec else None
    backoff_limit = 6 if limit is None else limit
    if (status.failed or 0) > backoff_limit:
        return False, f"{status.failed} failed pod(s)"
    return None


class _Watch:
    """Follows one Job or TrainJob to its end: its pod, the trainer's log, its conditions."""

    def __init__(self, kind: _Kind, core: Any, name: str, namespace: str, uid: str,
                 log: Callable, deadline: _Deadline, poll_s: float, pending_grace_s: float):
        self.kind, self.core, self.log = kind, core, log
        self.name, self.namespace, self.uid = name, namespace, uid
        self.trainer = kind.container
        self.what = f"{kind.name} {self.namespace}/{self.name}"
        self.deadline, self.poll_s, self.pending_grace_s = deadline, poll_s, pending_grace_s
        self.pod_name: str | None = None
        self.shown = 0  # trainer log lines already passed to `log`
        self.logs_done = False
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self.unschedulable_since: float | None = None
        self.podless_since = time.monotonic()

    def run(self) -> None:
        while True:
            # The Job before the pod: a finished Job's pod then shows the trainer's final state,
            # and its log is drained before this returns.
            state = self._api(self.kind.read, self.name, self.namespace)
            if state.deleting:
                raise LaunchError(f"{self.what} is being deleted ({BY_SOMEONE_ELSE})")
            pod = self._pod()
            if pod is not None and not self.logs_done and _started(pod, self.trainer):
                pod = self._follow(pod)
            if state.outcome is not None:
                succeeded, why = state.outcome
                if succeeded:
                    return
                raise JobFailed(self._report(f"{self.what} failed: {why or 'no reason given'}", pod))
            if pod is not None:
                self._check_stuck(pod)
            elif state.suspended:
                self.podless_since = None  # held by a queue (Kueue): no pod is expected yet
            else:
                self._check_podless()
            self.deadline.check()
            time.sleep(self.poll_s)

    def _pod(self) -> Any:
        """The newest pod that runs the trainer."""
        pods = self._api(self.core.list_namespaced_pod, self.namespace,
                         label_selector=self.kind.pod_selector(self.name))
        ours = [p for p in pods.items if self.kind.owns(p, self.uid)]
        if not ours:
            return None
        self.podless_since = None
        pod = max(ours, key=lambda p: p.metadata.creation_timestamp)
        if pod.metadata.name != self.pod_name:
            self.log(f"launcher: pod {pod.metadata.name}")
            self.pod_name, self.shown, self.logs_done = pod.metadata.name, 0, False
            self.tail.clear()
        return pod

    def _follow(self, pod: Any) -> Any:
        """Streams the trainer's log until the stream closes; returns the pod read afresh.

        A stream that closes while the trainer still runs, or stays silent for FOLLOW_READ_S
        (a connection that died without closing), is followed again on the next poll, skipping
        the lines already shown (counted: after the kubelet rotates the log, lines may be lost,
        never repeated).
        """
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError, MaxRetryError, ReadTimeoutError

        left = self.deadline.left()
        read_s = FOLLOW_READ_S if left is None else max(min(left, FOLLOW_READ_S), 0.01)
        silent = False
        seen = 0
        try:
            stream = self.core.read_namespaced_pod_log(
                pod.metadata.name, self.namespace, container=self.trainer, follow=True,
                _preload_content=False, _request_timeout=(REQUEST_TIMEOUT[0], read_s))
            try:
                for raw in stream:
                    seen += 1
                    if seen > self.shown:
                        line = raw.decode("utf-8", "replace").rstrip("\r\n")
                        self.log(line)
                        self.tail.append(line)
                        self.shown = seen
                    self.deadline.check()
            finally:
                stream.close()
                stream.release_conn()
        except (ReadTimeoutError, MaxRetryError) as e:
            # a quiet trainer, or a dead connection: check the Job, then follow again
            silent = isinstance(e, ReadTimeoutError) or isinstance(e.reason, ReadTimeoutError)
        except (ApiException, HTTPError):
            pass  # a refused or broken stream: polled and followed again like an early end
        fresh = self._pod()
        self.logs_done = fresh is None or _terminated(fresh, self.trainer)
        if not self.logs_done and not silent:
            self.log("launcher: the trainer's log stream ended early; following it again")
        return fresh

    def _api(self, call: Callable, *args: Any, **kwargs: Any) -> Any:
        """One read of the watch, retried while the API server is briefly unavailable (5xx,
        429, no answer) for up to API_RETRY_S; this Job gone means someone deleted it."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        give_up = time.monotonic() + API_RETRY_S
        delay = self.poll_s
        while True:
            try:
                return call(*args, _request_timeout=REQUEST_TIMEOUT, **kwargs)
            except ApiException as e:
                if e.status == 404:
                    raise LaunchError(f"{self.what} was deleted while it ran "
                                      f"({BY_SOMEONE_ELSE})") from e
                if e.status != 429 and e.status < 500 or time.monotonic() > give_up:
                    raise _api_error(f"watching {self.what}", e) from e
                why = f"HTTP {e.status} {e.reason}"
            except HTTPError as e:
                if time.monotonic() > give_up:
                    raise LaunchError(f"watching {self.what}: the API server did not answer "
                                      f"for {API_RETRY_S:g} s: {e}") from e
                why = str(e)
            self.log(f"launcher: the API server failed a read ({why}); retrying")
            self.deadline.check()
            time.sleep(delay)
            delay = min(delay * 2, 30.0)

    def _check_podless(self) -> None:
        """Fails a Job that has made no pod for `pending_grace_s`: a quota or an admission
        policy refused it, and the Job itself never fails for that."""
        if self.podless_since is None:
            self.podless_since = time.monotonic()  # its pod went away: count afresh
        waited = time.monotonic() - self.podless_since
        if waited <= self.pending_grace_s:
            return
        events = self._events()
        raise JobFailed(f"{self.what} has made no pod in {waited:.0f} s"
                        + (": " + "; ".join(events) if events else
                           f" (kubectl describe {self.kind.name.lower()} -n {self.namespace} "
                           f"{self.name} says why)"))

    def _events(self) -> list[str]:
        """The Job's warning events (FailedCreate says which quota or policy refused its pod)."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            events = self.core.list_namespaced_event(
                self.namespace, field_selector=f"involvedObject.uid={self.uid}",
                _request_timeout=REQUEST_TIMEOUT).items
        except (ApiException, HTTPError):
            return []
        return [f"{e.reason}: {e.message}" for e in events if e.type == "Warning"][-3:]

    def _check_stuck(self, pod: Any) -> None:
        """Fails fast on a pod that cannot start: a bad image, a crashing sidecar, no node."""
        for status in _statuses(pod):
            waiting = status.state.waiting
            if waiting is not None and waiting.reason in STUCK_REASONS:
                raise JobFailed(self._report(
                    f"{self.what} cannot start: container {status.name} is in {waiting.reason}"
                    f"{': ' + waiting.message if waiting.message else ''}", pod))
        unschedulable = next((c for c in pod.status.conditions or []
                              if c.type == "PodScheduled" and c.status == "False"
                              and c.reason == "Unschedulable"), None)
        if unschedulable is None:
            self.unschedulable_since = None
            return
        if self.unschedulable_since is None:
            self.unschedulable_since = time.monotonic()
        waited = time.monotonic() - self.unschedulable_since
        if waited > self.pending_grace_s:
            raise JobFailed(f"{self.what} cannot be scheduled (Unschedulable for {waited:.0f} s): "
                            f"{unschedulable.message or 'no node fits the pod'}")

    def _report(self, headline: str, pod: Any) -> str:
        """The headline, then each container that exited with an error and the trainer's last lines."""
        parts = [headline]
        for status in _statuses(pod) if pod is not None else []:
            ended, previous = _failure(status)
            if ended is not None:
                parts.append(f"container {status.name} exited with code {ended.exit_code} "
                             f"({ended.reason or 'no reason given'})"
                             f"{': ' + ended.message if ended.message else ''}")
            if status.name == self.trainer and self.tail:
                lines = list(self.tail)
            elif status.name == self.trainer or ended is not None:
                lines = self._read_tail(pod, status.name, previous)
            else:
                continue
            if lines:
                parts += [f"--- last {len(lines)} lines of {status.name} ---", *lines]
        return "\n".join(parts)

    def _read_tail(self, pod: Any, container: str, previous: bool) -> list[str]:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            # Unparsed: the client would turn a log that happens to be one JSON line into a dict.
            response = self.core.read_namespaced_pod_log(
                pod.metadata.name, self.namespace, container=container, tail_lines=TAIL_LINES,
                previous=previous, _preload_content=False, _request_timeout=REQUEST_TIMEOUT)
            try:
                data = response.data
            finally:
                response.release_conn()
        except (ApiException, HTTPError):
            return []  # a container that never started has no log
        return data.decode("utf-8", "replace").splitlines()[-TAIL_LINES:]

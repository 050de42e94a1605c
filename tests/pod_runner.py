"""Run a rendered Pod spec here, as a kubelet would, with local processes for containers.

No container runtime or cluster is at hand, but every process a manifest starts can run:
init containers in order, native sidecars (init containers with `restartPolicy: Always`)
started and waited for through their startup probes, then the main containers, each with
its rendered command, args and env (Secret and ConfigMap references resolved from what the
test gives), its probes (exec, httpGet on a named or numbered port, tcpSocket) polled within
their rendered thresholds. An image is mapped to a local environment (`Image`): which
executables stand for the image's, and flags appended to its main command (SGLang's CPU
flags). Volumes are directories: a path under a container's mount is rewritten to the
volume's directory in the command, args, env and probes, and `/tmp` without a mount is the
container's own scratch directory. Cluster addresses (a Service's DNS name, the store's
endpoint) are rewritten to loopback ones through `hosts`. Ports are the rendered ones, on
loopback: a wrong flag, path, port, env name or probe fails the test.

Not here: scheduling, resource limits, security contexts (a test of its own runs SGLang on a
read-only root), networking between pods.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class Image:
    """A local stand-in for an image: executable name -> local path, flags for its command."""

    executables: dict[str, str]
    # executable -> flags after a main command that runs it (not the probes): SGLang's CPU flags
    append: dict[str, tuple[str, ...]] = field(default_factory=dict)


class PodFailed(AssertionError):
    """A container exited with an error, or a probe did not pass in time."""


@dataclass
class PodRunner:
    spec: dict  # a Pod's spec (or a Deployment's template's)
    images: Callable[[str], Image]  # image reference -> its local stand-in
    workdir: Path
    secrets: dict[tuple[str, str], str] = field(default_factory=dict)  # (name, key) -> value
    config_maps: dict[tuple[str, str], str] = field(default_factory=dict)
    hosts: dict[str, str] = field(default_factory=dict)  # text in a value -> its loopback form
    base_env: dict[str, str] = field(default_factory=lambda: {"PATH": os.environ["PATH"]})
    poll_s: float = 1.0  # probes are polled this often, within their rendered budget
    running: dict[str, subprocess.Popen] = field(default_factory=dict)
    exited: dict[str, int] = field(default_factory=dict)  # run-to-completion containers
    started: set[str] = field(default_factory=set)  # startup probe passed (or none)

    # --- the pod's lifecycle -------------------------------------------------------------
    def start(self) -> None:
        """Init containers in order (sidecars until started), then the main containers up
        to their startup probes and readiness."""
        for c in self.spec.get("initContainers", []):
            if c.get("restartPolicy") == "Always":  # a native sidecar: up, then the next
                self._launch(c)
                self._wait_started(c)
            else:
                self.run_to_completion(c)
        for c in self.spec["containers"]:
            self._launch(c)
        for c in self.spec["containers"]:
            self._wait_started(c)
        for c in [*self._sidecars(), *self.spec["containers"]]:
            self._wait_ready(c)

    def run_pod(self) -> dict[str, int]:
        """The pod's whole course (restartPolicy Never): up, the main containers to their end,
        then the sidecars stopped, as a kubelet does. Returns the main containers' exit codes."""
        self.start()
        codes = {c["name"]: self.running[c["name"]].wait() for c in self.spec["containers"]}
        self.stop()
        return codes

    def run_to_completion(self, c: dict, timeout_s: float = 300) -> str:
        """Runs one container to its end; raises PodFailed on a non-zero exit. Returns its log."""
        proc = self._launch(c)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self._kill(proc)
            raise PodFailed(f"container {c['name']} did not end in {timeout_s:g} s:\n"
                            f"{self.log(c['name'])}") from None
        finally:
            self.running.pop(c["name"], None)
            self.exited[c["name"]] = proc.returncode
        if proc.returncode != 0:
            raise PodFailed(f"container {c['name']} exited with code {proc.returncode}:\n"
                            f"{self.log(c['name'])}")
        return self.log(c["name"])

    def stop(self) -> None:
        for proc in list(self.running.values()):
            self._kill(proc)

    def state(self, name: str) -> tuple[str, int | None]:
        """("waiting" | "running" | "terminated", exit code) of a container, as a kubelet
        reports it."""
        if name in self.exited:
            return "terminated", self.exited[name]
        proc = self.running.get(name)
        if proc is None:
            return "waiting", None
        code = proc.poll()
        return ("running", None) if code is None else ("terminated", code)

    def __enter__(self) -> "PodRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def log(self, name: str, lines: int = 60) -> str:
        path = self.workdir / "logs" / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def probe(self, c: dict, kind: str) -> bool:
        """One run of the container's `kind` probe (True when it has none)."""
        probe = c.get(kind)
        if probe is None:
            return True
        timeout = probe.get("timeoutSeconds", 1)
        if "exec" in probe:
            command = self._command(c, probe["exec"]["command"], main=False)
            try:
                return subprocess.run(command, env=self._env(c), capture_output=True,
                                      timeout=timeout).returncode == 0
            except subprocess.TimeoutExpired:
                return False
        if "httpGet" in probe:
            get = probe["httpGet"]
            url = f"http://127.0.0.1:{self._port(c, get['port'])}{get.get('path', '/')}"
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    return 200 <= response.status < 400
            except OSError:
                return False
        if "tcpSocket" in probe:
            import socket

            with socket.socket() as s:
                s.settimeout(timeout)
                return s.connect_ex(("127.0.0.1", self._port(c, probe["tcpSocket"]["port"]))) == 0
        raise ValueError(f"container {c['name']}: a {kind} of no known kind: {probe}")

    # --- one container ---------------------------------------------------------------------
    def _sidecars(self) -> list[dict]:
        return [c for c in self.spec.get("initContainers", []) if c.get("restartPolicy") == "Always"]

    def _launch(self, c: dict) -> subprocess.Popen:
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        command = self._command(c, [*c.get("command", []), *c.get("args", [])], main=True)
        log = open(self.workdir / "logs" / f"{c['name']}.log", "w")
        try:
            proc = subprocess.Popen(command, env=self._env(c), stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    cwd=c.get("workingDir") and self._path(c, c["workingDir"]))
        finally:
            log.close()
        self.running[c["name"]] = proc
        return proc

    def _wait_started(self, c: dict) -> None:
        """Until the startup probe passes, within failureThreshold x periodSeconds."""
        probe = c.get("startupProbe")
        if probe is not None:
            budget = probe.get("initialDelaySeconds", 0) + \
                probe.get("failureThreshold", 3) * probe.get("periodSeconds", 10)
            self._until(c, "startupProbe", budget)
        self.started.add(c["name"])

    def _wait_ready(self, c: dict) -> None:
        probe = c.get("readinessProbe")
        if probe is None:
            return
        self._until(c, "readinessProbe", probe.get("initialDelaySeconds", 0) +
                    probe.get("failureThreshold", 3) * probe.get("periodSeconds", 10))
        if not self.probe(c, "livenessProbe"):
            raise PodFailed(f"container {c['name']}: its livenessProbe fails once it is ready:\n"
                            f"{self.log(c['name'])}")

    def _until(self, c: dict, kind: str, budget_s: float) -> None:
        deadline = time.monotonic() + budget_s
        while not self.probe(c, kind):
            proc = self.running.get(c["name"])
            if proc is not None and proc.poll() is not None:
                raise PodFailed(f"container {c['name']} exited with code {proc.returncode} "
                                f"before its {kind} passed:\n{self.log(c['name'])}")
            if time.monotonic() > deadline:
                raise PodFailed(f"container {c['name']}: its {kind} did not pass within "
                                f"{budget_s:g} s:\n{self.log(c['name'])}")
            time.sleep(self.poll_s)

    def _mounts(self, c: dict) -> dict[str, Path]:
        """mountPath -> its directory here ("/tmp" is the container's own, if not mounted)."""
        volumes = {v["name"]: v for v in self.spec.get("volumes", [])}
        mounts = {}
        for m in c.get("volumeMounts", []):
            volume = volumes[m["name"]]  # a mount of no volume fails here
            if not ({"emptyDir", "configMap", "secret"} & volume.keys()):
                raise ValueError(f"volume {m['name']}: only emptyDir, configMap and secret here")
            directory = self.workdir / "volumes" / m["name"]
            directory.mkdir(parents=True, exist_ok=True)
            mounts[m["mountPath"].rstrip("/")] = directory / m.get("subPath", "")
        mounts.setdefault("/tmp", self.workdir / "containers" / c["name"] / "tmp")
        mounts["/tmp"].mkdir(parents=True, exist_ok=True)
        return mounts

    def _path(self, c: dict, text: str) -> str:
        """`text` with each path under a mount, and each cluster address, made local."""
        for cluster, local in self.hosts.items():
            text = text.replace(cluster, local)
        mounts = self._mounts(c)
        # One pass, longest mount first: a local directory (under /tmp, say) is never rewritten.
        alternatives = "|".join(re.escape(m) for m in sorted(mounts, key=len, reverse=True))
        return re.sub(rf"(?<![\w./-])({alternatives})(?=/|\b|$)",
                      lambda match: str(mounts[match[1]]), text)

    def _command(self, c: dict, argv: list[str], main: bool) -> list[str]:
        if not argv:
            raise ValueError(f"container {c['name']}: no command (the image's entrypoint is "
                             "not known here)")
        image = self.images(c["image"])
        first = image.executables.get(argv[0])
        if first is None:
            raise ValueError(f"container {c['name']}: {argv[0]!r} has no stand-in for image "
                             f"{c['image']}")
        return [first, *(self._path(c, a) for a in argv[1:]),
                *(image.append.get(argv[0], ()) if main else ())]

    def _env(self, c: dict) -> dict[str, str]:
        # A container's /tmp is its own: temporary files land in the pod's directory too.
        env = {**self.base_env, "TMPDIR": str(self._mounts(c)["/tmp"])}
        for source in c.get("envFrom", []):
            raise ValueError(f"container {c['name']}: envFrom {source} is not resolved here")
        for entry in c.get("env", []):
            if "value" in entry:
                value = entry["value"]
            elif "secretKeyRef" in entry.get("valueFrom", {}):
                ref = entry["valueFrom"]["secretKeyRef"]
                value = self.secrets[ref["name"], ref["key"]]  # a missing Secret key fails here
            elif "configMapKeyRef" in entry.get("valueFrom", {}):
                ref = entry["valueFrom"]["configMapKeyRef"]
                value = self.config_maps[ref["name"], ref["key"]]
            else:
                raise ValueError(f"container {c['name']}: env {entry['name']} comes from "
                                 f"{entry.get('valueFrom')}, not resolved here")
            env[entry["name"]] = self._path(c, str(value))
        return env

    def _port(self, c: dict, port: int | str) -> int:
        if isinstance(port, int) or str(port).isdigit():
            return int(port)
        for p in c.get("ports", []):
            if p.get("name") == port:
                return p["containerPort"]
        raise ValueError(f"container {c['name']}: no port named {port!r}")

    @staticmethod
    def _kill(proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

"""A Ray cluster of several nodes on this machine, started the way docs/ray-cluster.md says:
`ray start --head --num-cpus=0`, worker nodes joining it, token authentication on.

Every node is one `ray start --block` process in its own process group, so a node is killed (a
lost machine) or stopped by its process group alone: never `ray stop`, which ends every Ray on
the machine. Ports are picked free, and each cluster has its own short temporary folder (removed when the
cluster stops; RSDIST_KEEP_CLUSTER_TMP=1 keeps it, with the nodes' and the jobs' logs).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

BIN = os.path.dirname(sys.executable)
REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    """Head (no CPUs: it runs drivers and the job server only) plus worker nodes, all local."""

    def __init__(self, object_store_mb: int = 200, head_cpus: int = 0, autoscaling_config: dict | None = None):
        self.tmp = tempfile.mkdtemp(prefix="rsc", dir="/tmp")  # short: Ray's socket paths have a length limit
        self.token_path = os.path.join(self.tmp, "auth_token")
        with open(self.token_path, "w") as f:
            f.write(secrets.token_hex(32))
        self.env = {
            **os.environ,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": self.token_path,
            "RAY_USAGE_STATS_ENABLED": "0",
            # a busy test machine starts Ray Train's workers slowly (torch imports): allow it
            "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "300",
            # a SIGKILLed node is found dead after 5 failed health checks a second apart (Ray's
            # default: 3 s apart, ~15-30 s); a live node that is slow to answer still has 10 s a check
            "RAY_health_check_period_ms": "1000",
            "RAY_health_check_failure_threshold": "5",
            "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "PATH": BIN + os.pathsep + os.environ.get("PATH", ""),
        }
        self.env.pop("RAY_ADDRESS", None)
        self.port, self.dashboard_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.object_store = object_store_mb * 1024 * 1024
        self.nodes: list[subprocess.Popen] = []
        cmd = [
            "--head", f"--num-cpus={head_cpus}", f"--port={self.port}", f"--dashboard-port={self.dashboard_port}",
            "--include-dashboard=true", f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
            f"--temp-dir={self.tmp}/ray", f"--object-store-memory={self.object_store}", "--disable-usage-stats",
        ]
        if autoscaling_config is not None:
            autoscaling_config["provider"]["gcs_address"] = self.address
            path = os.path.join(self.tmp, "autoscaler.yaml")
            with open(path, "w") as f:
                json.dump(autoscaling_config, f)
            self.autoscaler_config = path
            cmd.append(f"--autoscaling-config={path}")
            self.env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
        self.head = self._start(cmd)
        self.wait_for(lambda: self.alive_nodes() >= 1, 300, "the head node")

    def _start(self, args: list[str]) -> subprocess.Popen:
        log = open(os.path.join(self.tmp, f"node-{len(self.nodes)}.log"), "wb")
        p = subprocess.Popen([os.path.join(BIN, "ray"), "start", "--block", *args], env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.nodes.append(p)
        return p

    def add_worker(self, num_cpus: float, resources: dict | None = None, wait: bool = True) -> subprocess.Popen:
        before = self.alive_nodes()
        # its own temporary folder, as on a machine of its own: nodes sharing one set up a job's
        # working directory in the same place, and each new node deletes and unpacks it again
        # while the other nodes' workers import from it (`No module named 'rsdist.cluster.engine'`)
        args = [f"--address={self.address}", f"--num-cpus={num_cpus}", f"--dashboard-agent-listen-port={free_port()}", f"--object-store-memory={self.object_store}",
                "--disable-usage-stats", f"--temp-dir={self.tmp}/n{len(self.nodes)}"]
        if resources:
            args.append(f"--resources={json.dumps(resources)}")
        p = self._start(args)
        if wait:
            try:
                self.wait_for(lambda: self.alive_nodes() > before, 300, f"a worker node of {num_cpus} CPUs")
            except TimeoutError as e:
                with open(os.path.join(self.tmp, f"node-{len(self.nodes) - 1}.log"), errors="replace") as f:
                    raise TimeoutError(f"{e}; its log ends: {f.read()[-1500:]}") from None
        return p

    def kill(self, node: subprocess.Popen) -> None:
        """A lost machine: SIGKILL to the node's whole process group (raylet, workers, agents)."""
        try:
            os.killpg(node.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        node.wait()

    def stop(self) -> None:
        for node in reversed(self.nodes):
            self.kill(node)
        self._kill_leftovers()
        if not os.environ.get("RSDIST_KEEP_CLUSTER_TMP"):
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _kill_leftovers(self) -> None:
        """Processes of this cluster that left their node's process group (e.g. nodes the fake
        autoscaler started), found by this cluster's own temporary folder or GCS port."""
        mark = re.compile(rf"{re.escape(self.tmp)}|127\.0\.0\.1:{self.port}(?!\d)")
        for pid in os.listdir("/proc"):
            if not pid.isdigit() or int(pid) == os.getpid():
                continue
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmdline = f.read().decode(errors="replace")
            except OSError:
                continue
            if mark.search(cmdline):
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def ray(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        """A `ray` CLI command against this cluster (the job server for `ray job ...`)."""
        env = {**self.env, "RAY_API_SERVER_ADDRESS": self.dashboard, "RAY_ADDRESS": self.dashboard}
        return subprocess.run([os.path.join(BIN, "ray"), *args], env=env, capture_output=True, text=True, timeout=timeout)

    def live_nodes(self) -> list[dict]:
        """The live nodes, from the dashboard's state API (token in the header); empty when it does not answer."""
        with open(self.token_path) as f:
            request = urllib.request.Request(f"{self.dashboard}/api/v0/nodes", headers={"Authorization": f"Bearer {f.read().strip()}"})
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                nodes = json.loads(r.read())["data"]["result"]["result"]
        except (OSError, ValueError, KeyError):
            return []
        return [n for n in nodes if n["state"] == "ALIVE"]

    def node_resources(self) -> list[dict]:
        """The resources of each live node."""
        return [n["resources_total"] for n in self.live_nodes()]

    def alive_nodes(self) -> int:
        return len(self.node_resources())

    def alive_node_ids(self) -> set[str]:
        """The ids of the live nodes (empty when the state API does not answer)."""
        return {n["node_id"] for n in self.live_nodes()}

    @staticmethod
    def wait_for(condition, timeout: float, what: str, every: float = 1.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            time.sleep(every)
        raise TimeoutError(f"{what}: not there after {timeout:.0f} s")

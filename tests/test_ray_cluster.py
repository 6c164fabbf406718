"""A sweep against a real Ray cluster of two nodes on this machine: a head (no accelerator) and a separate
worker started with ``ray start`` that alone declares the custom resource ``accel`` (standing in for a GPU
type). Cells ask for one ``accel`` each, so they must run on the worker; the test checks where each cell ran
(Ray node id, process id) and that its results came back to the driver. Teardown stops exactly the node
processes this test started (their process groups), never other Ray instances on the machine."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow  # starting two Ray nodes takes ~20 s; the sweep runs two tiny cells on the worker

RAY = str(Path(sys.executable).with_name("ray"))
RESOURCE = "accel"
# A throwaway local cluster: no token auth (Ray >= 2.5x turns it on for a head when ~/.ray/auth_token exists,
# and then every client, the driver included, would need the token).
NO_TOKEN = {"RAY_AUTH_MODE": "disabled"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(args: list[str], log: Path) -> subprocess.Popen:
    """``ray start --block`` in its own session, so teardown can stop everything it started, and only that."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1", **NO_TOKEN}
    return subprocess.Popen([RAY, "start", "--block", "--disable-usage-stats", *args], env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def _session_pids(sid: int) -> list[int]:
    """Processes still in session ``sid`` (raylet, GCS, workers the node started)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid:
                    found.append(int(entry.name))
            except (ProcessLookupError, PermissionError):
                continue
    return found


def _stop(node: subprocess.Popen) -> None:
    sid = node.pid  # start_new_session: the session id is the leader's pid
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _session_pids(sid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + 10
        while _session_pids(sid) and time.time() < deadline:
            time.sleep(0.2)
        if not _session_pids(sid):
            break
    node.wait(timeout=10)


def _wait_for_nodes(address: str, count: int, timeout: float = 90) -> list[dict]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        alive = [n for n in ray.nodes() if n["Alive"]]
        if len(alive) >= count:
            return alive
        time.sleep(0.5)
    raise TimeoutError(f"the Ray cluster at {address} did not reach {count} nodes")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    saved = {name: os.environ.get(name) for name in NO_TOKEN}
    os.environ.update(NO_TOKEN)  # the driver (this process) too
    try:
        yield from _cluster(tmp_path_factory)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _cluster(tmp_path_factory):
    logs = tmp_path_factory.mktemp("ray-logs")
    port = _free_port()
    address = f"127.0.0.1:{port}"
    nodes = [_start(["--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0",
                     "--include-dashboard=false"], logs / "head.log")]
    try:
        time.sleep(3)
        nodes.append(_start([f"--address={address}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
                             "--num-gpus=0", f"--resources={json.dumps({RESOURCE: 1})}"], logs / "worker.log"))
        ray.init(address=address, log_to_driver=False)
        alive = _wait_for_nodes(address, 2)
        worker = [n["NodeID"] for n in alive if n["Resources"].get(RESOURCE)]
        head = [n["NodeID"] for n in alive if not n["Resources"].get(RESOURCE)]
        assert len(worker) == 1 and len(head) == 1
        yield {"address": address, "worker": worker[0], "head": head[0], "logs": logs}
    finally:
        ray.shutdown()
        for node in reversed(nodes):
            _stop(node)
        _forget_address(address)


def _forget_address(address: str) -> None:
    """`ray start --head` records its address for later `ray.init()` calls; a stopped head must not stay there."""
    record = Path("/tmp/ray/ray_current_cluster")
    try:
        if record.read_text().strip() == address:
            record.unlink()
    except OSError:
        pass


def test_sweep_cells_run_on_the_worker_and_results_come_back(cluster, tmp_path):
    from rich.console import Console

    from harness.run.sweep import SweepConfig, run_sweep

    sweep = SweepConfig.model_validate({
        "name": "ray-cluster",
        "base": {"model": {"ref": "tiny-llama", "device": "cpu"}, "cache_dir": str(tmp_path / "cache"),
                 "output_dir": str(tmp_path / "runs"), "compare_undefended": False,
                 "evaluate": {"harmfulness": {"num_prompts": 4, "generation": {"max_new_tokens": 6},
                                              "judges": [{"name": "refusal-keywords"}]}}},
        "defences": ["none"],
        "attacks": [{"name": "full-ft", "params": {"num_samples": 8, "max_length": 48}}],
        "seeds": [1, 2],
        "executor": "ray",
        "threads_per_cell": 1,
        "ray": {"address": cluster["address"], "num_cpus_per_cell": 1, "resources_per_cell": {RESOURCE: 1}},
    })
    directory = run_sweep(sweep, Console(stderr=True))
    cells = json.loads((directory / "sweep.json").read_text())["cells"]
    assert [c["status"] for c in cells] == ["ok", "ok"], cells
    for cell in cells:
        print(f"cell seed {cell['seed']} ran on {cell['ran_on']} (worker {cluster['worker']}, head {cluster['head']})")
        assert cell["ran_on"]["ray_node"] == cluster["worker"]  # never the head: it has no accel
        assert cell["ran_on"]["pid"] != os.getpid()
        results = json.loads((Path(cell["run_dir"]) / "results.json").read_text())  # written by the worker
        assert results["seed"] == cell["seed"]
        assert results["summary"]["branches"]["defended"]["post_attack"]["harmfulness"]["n"] == 4
    matrix = json.loads((directory / "matrix.json").read_text())
    assert matrix  # the driver built the Table-1 matrix from the results the worker wrote


def test_a_resource_no_node_has_is_refused_before_any_cell(cluster, tmp_path):
    from rich.console import Console

    from harness.errors import HarnessError
    from harness.run.executors import run_ray

    done = []
    with pytest.raises(HarnessError, match="custom resource 'h100'.*ray start --resources"):
        run_ray([{"cache_dir": str(tmp_path), "output_dir": str(tmp_path)}], 1, Console(quiet=True),
                lambda i, o: done.append(o), cluster["address"], 1, 0, {"h100": 1})
    assert done == []

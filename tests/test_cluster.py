"""A real multi-node Ray cluster on this machine (a head and a second node, token authentication ON as Ray 2.59+
starts it), an MLflow server with proxied artifacts, and ``bench.run --address`` from a folder with no data
beside it: every trial FINISHED in the server store, its artifacts downloadable through the server, trials on
two nodes, the report run present, and every process the test started gone afterwards."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Iterator

import psutil
import pytest
import yaml

from bench.tracking import CONFIG_DIGEST_TAG, client, runs_frame
from tests.conftest import reap

BIN = Path(sys.executable).parent
SWEEP = {
    "name": "cluster",
    "n_edits": 3,
    "seeds": [0, 1],
    "max_concurrent": 2,
    "resources": {"cpu": 1},
    "models": ["tiny-gpt2"],
    "datasets": [{"name": "zsre", "n_train": 16, "n_val": 4}],
    "methods": [{"name": "ft", "hparams": {"lr": 1.0e-2, "max_steps": 3}},
                {"name": "mend", "hparams": {"lr": 1.0e-3, "rank": 8},
                 "budget": {"max_steps": 4, "val_every": 2, "val_edits": 2}}],
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _marked(marker: str) -> list[psutil.Process]:
    """Every live process carrying the test's marker in its environment (Ray's daemons, workers and agents inherit
    it from ``ray start``; the MLflow server from its Popen)."""
    out = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("EDITBENCH_TEST_CLUSTER") == marker:
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return out


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """Head + one more node (1 CPU each) with token auth, and an MLflow server, started once for the module; all
    torn down after. (What bench.run refuses before joining a cluster is tested in test_bad_input.py, without
    one.)"""
    tmp_path = tmp_path_factory.mktemp("cluster")
    marker = uuid.uuid4().hex
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {**os.environ, "EDITBENCH_TEST_CLUSTER": marker, "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN_PATH": str(token)}
    env.pop("RAY_AUTH_TOKEN", None)
    port, mport = _free_port(), _free_port()
    temp = tempfile.mkdtemp(prefix="ebc", dir="/tmp")  # short: Ray's unix sockets live under it
    common = ["--num-cpus", "1", "--object-store-memory", str(100 * 2**20), "--disable-usage-stats"]
    server = None
    try:
        subprocess.run([str(BIN / "ray"), "start", "--head", "--port", str(port), "--temp-dir", temp,
                        "--include-dashboard=false", *common], env=env, check=True, capture_output=True, timeout=120)
        subprocess.run([str(BIN / "ray"), "start", "--address", f"127.0.0.1:{port}", *common], env=env, check=True,
                       capture_output=True, timeout=120)
        srv = tmp_path / "server"
        srv.mkdir()
        server = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{srv / 'srv.db'}",
             "--artifacts-destination", str(srv / "artifacts"), "--host", "127.0.0.1", "--port", str(mport),
             "--workers", "1"], env={**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, cwd=srv,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        url = f"http://127.0.0.1:{mport}"
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2):
                    break
            except OSError:
                assert time.time() < deadline and server.poll() is None, "MLflow server did not come up"
                time.sleep(0.5)
        yield {"address": f"127.0.0.1:{port}", "uri": url, "env": env, "token": token, "marker": marker}
    finally:
        if server is not None and server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
        reap(_marked(marker))


@pytest.mark.slow
def test_sweep_on_a_two_node_cluster_with_an_mlflow_server(cluster: dict, tmp_path: Path) -> None:
    work = tmp_path / "elsewhere" / "work"  # run outside the clone: the driver ships the data to the workers
    work.mkdir(parents=True)
    f = work / "cluster.yaml"
    f.write_text(yaml.safe_dump(SWEEP))
    env = {k: v for k, v in cluster["env"].items() if k != "RAY_AUTH_MODE"}  # bench.run turns token mode on itself
    t0 = time.time()
    out = subprocess.run([sys.executable, "-m", "bench.run", str(f), "--address", cluster["address"],
                          "--tracking-uri", cluster["uri"]], cwd=work, env=env, capture_output=True, text=True,
                         timeout=600)
    wall = time.time() - t0
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    uri = cluster["uri"]
    df = runs_frame(uri, "cluster")
    trials = df.filter(df[f"t.{CONFIG_DIGEST_TAG}"].is_not_null())
    assert trials.height == 4 and set(trials["status"]) == {"FINISHED"}  # (ft, mend) x 2 seeds
    assert trials["es"].null_count() == 0 and trials["loc_kl"].null_count() == 0
    assert trials["t.ray.node_id"].n_unique() >= 2, trials.select("run_name", "t.ray.node_id")
    assert trials["t.host"].null_count() == 0
    assert set(trials["p.data.train_file"]) == {"zsre/zsre_mend_800.json"}  # read from the shipped copy
    assert (df["t.editbench.kind"] == "report").sum() == 1
    c = client(uri)
    dl = tmp_path / "dl"
    for row in trials.iter_rows(named=True):
        arts = {a.path for a in c.list_artifacts(row["run_id"])}
        assert c.get_run(row["run_id"]).info.artifact_uri.startswith("mlflow-artifacts:")  # proxied by the server
        got = Path(c.download_artifacts(row["run_id"], "per_edit.parquet", str(dl)))
        assert got.stat().st_size > 0
        if row["p.method"] == "mend":
            assert "editor" in arts
            ckpt = Path(c.download_artifacts(row["run_id"], "editor", str(dl)))
            assert any(p.suffix == ".safetensors" for p in ckpt.rglob("*"))
    print(f"cluster sweep wall time {wall:.0f}s; nodes {sorted(set(trials['t.ray.node_id']))}")

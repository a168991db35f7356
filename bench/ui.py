"""``python -m bench.ui``: serve the MLflow UI for the store the sweeps used.

```
python -m bench.ui [--tracking-uri URI] [--host 127.0.0.1] [--port 5000]
```

Light settings: one worker and no job runner (``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false``). Binds to loopback
unless ``--host`` says otherwise, prints the URL and, for each experiment with runs, the address of its runs table
(``#/experiments/<id>/runs``: MLflow 3's UI would otherwise open an experiment on its GenAI overview, traces: 0),
and stops the server cleanly on Ctrl-C (or SIGTERM).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from bench import cli
from bench.tracking import TrackingError, check_tracking_uri, default_tracking_uri, ping

log = logging.getLogger(__name__)


def server_command(uri: str, host: str, port: int) -> list[str]:
    """The ``mlflow server`` command line for ``uri``."""
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", host,
           "--port", str(port), "--workers", "1"]
    if uri.startswith("sqlite:///"):
        # New experiments created from the UI keep their artifacts beside the store, like bench.run's.
        root = Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts"
        cmd += ["--artifacts-destination", str(root)]
    return cmd


def wait_until_up(url: str, timeout: float = 90.0, proc: subprocess.Popen | None = None) -> bool:
    """Poll ``url`` until it answers 200 (True), ``timeout`` seconds pass or ``proc`` exits (False)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            time.sleep(0.5)
    return False


def port_free(host: str, port: int) -> str | None:
    """None when ``host:port`` can be bound now, else the reason (in use, unknown host, not allowed)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        return f"unknown host ({e.strerror})"
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind(addr)
        except OSError as e:
            return e.strerror or str(e)
    return None


def runs_views(base_url: str, timeout: float = 10.0) -> list[tuple[str, str]]:
    """(experiment name, the URL of its runs table) for every active experiment that holds runs, the most
    recently created first, asked of the running server's REST API (this process never opens the store)."""
    def post(path: str, body: dict) -> dict:
        req = urllib.request.Request(f"{base_url.rstrip('/')}/api/2.0/mlflow/{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read().decode() or "{}")

    exps = post("experiments/search", {"max_results": 1000}).get("experiments", [])
    out = []
    for exp in sorted(exps, key=lambda e: -int(e.get("creation_time") or 0)):
        if post("runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 1}).get("runs"):
            out.append((exp["name"], f"{base_url.rstrip('/')}/#/experiments/{exp['experiment_id']}/runs"))
    return out


def _serve(uri: str, host: str, port: int) -> int:
    """Run ``mlflow server`` on ``uri`` at ``host:port`` until it exits or Ctrl-C/SIGTERM; print its address and
    each experiment's runs view once it answers. Returns the exit code; the server never outlives this call."""
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(server_command(uri, host, port), env=env, start_new_session=True)
    url = f"http://{host}:{port}/"

    def stop(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        if not wait_until_up(url, proc=proc):
            code = proc.poll()
            why = f"exited with code {code}" if code is not None else "did not answer within 90 s"
            print(f"error: the MLflow server at {url} {why}", file=sys.stderr)
            return 1
        print(f"MLflow UI for {uri}: {url}  (Ctrl-C to stop)", flush=True)
        try:
            for name, view in runs_views(url):
                print(f"  runs of {name}: {view}", flush=True)
        except (OSError, ValueError) as e:  # the address is what matters; the list is a convenience
            log.warning("could not list the experiments' runs views: %s", e)
        code = proc.wait()
        if code != 0:
            print(f"error: the MLflow server exited with code {code}", file=sys.stderr)
            return 1
        return 0
    except KeyboardInterrupt:
        print("stopping the MLflow UI", flush=True)
        return 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    ap = cli.parser("python -m bench.ui", __doc__,
                    {0: "stopped with Ctrl-C or SIGTERM", 1: "the MLflow server exited or did not come up",
                     2: "no store, a bad --port/--host, or the port is taken (one line)"},
                    "python -m bench.ui --tracking-uri sqlite:///./mlruns.db --port 5000")
    ap.add_argument("--tracking-uri", default=None, help="MLflow store; default: sqlite:///./mlruns.db (bench.run's)")
    ap.add_argument("--host", default="127.0.0.1", help="interface to bind (loopback unless you widen it)")
    ap.add_argument("--port", type=int, default=5000, help="TCP port, 1-65535")
    ap.add_argument("-v", "--verbose", action="store_true", help="show tracebacks of errors")
    args = ap.parse_args(argv)
    if not 1 <= args.port <= 65535:
        return cli.fail(f"--port {args.port}: not a TCP port; use 1-65535")
    try:
        uri = check_tracking_uri(args.tracking_uri or default_tracking_uri(), must_exist=True, writable=False)
        if uri.startswith(("http://", "https://")):  # a server (a cluster's) serves its own UI
            ping(uri)
            print(f"the MLflow UI of {uri} is served by that server: open {uri.rstrip('/')}/ in a browser")
            return 0
    except TrackingError as e:
        return cli.report_user_error(e, args.verbose)
    busy = port_free(args.host, args.port)
    if busy:
        return cli.fail(f"--host {cli.cut(args.host)} --port {args.port}: cannot listen there ({busy}); pick "
                        "another --port")
    return _serve(uri, args.host, args.port)


if __name__ == "__main__":
    sys.exit(main())

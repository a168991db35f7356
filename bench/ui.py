"""``python -m bench.ui``: serve the MLflow UI for the store the sweeps used.

```
python -m bench.ui [--tracking-uri URI] [--host 127.0.0.1] [--port 5000]
```

Light settings: one worker and no job runner (``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false``). Binds to loopback
unless ``--host`` says otherwise, prints the URL, and stops the server cleanly on Ctrl-C (or SIGTERM).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def server_command(uri: str, host: str, port: int) -> list[str]:
    """The ``mlflow server`` command line for ``uri``."""
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", host,
           "--port", str(port), "--workers", "1"]
    if uri.startswith("sqlite:///"):
        # New experiments created from the UI keep their artifacts beside the store, like bench.run's.
        root = Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts"
        cmd += ["--artifacts-destination", str(root)]
    return cmd


def wait_until_up(url: str, timeout: float = 90.0) -> bool:
    """Poll ``url`` until it answers 200 or ``timeout`` seconds pass."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            time.sleep(0.5)
    return False


def main(argv: list[str] | None = None) -> int:
    from bench.tracking import default_tracking_uri

    ap = argparse.ArgumentParser(prog="python -m bench.ui", description=__doc__.splitlines()[0])
    ap.add_argument("--tracking-uri", default=None, help="default: sqlite:///./mlruns.db (what bench.run uses)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=5000)
    args = ap.parse_args(argv)
    uri = args.tracking_uri or default_tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        print(f"error: no MLflow store at {uri}; run a sweep first (python -m bench.run sweeps/zsre.yaml) "
              "or pass --tracking-uri", file=sys.stderr)
        return 2
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(server_command(uri, args.host, args.port), env=env, start_new_session=True)
    url = f"http://{args.host}:{args.port}/"

    def stop(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        if wait_until_up(url):
            print(f"MLflow UI for {uri}: {url}  (Ctrl-C to stop)", flush=True)
        else:
            print(f"MLflow server did not answer at {url}", file=sys.stderr)
        return proc.wait()
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


if __name__ == "__main__":
    sys.exit(main())

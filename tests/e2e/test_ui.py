"""`lorasweep ui` serves the default store on 127.0.0.1."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path

from lorasweep.tracking.ui import ui_command
from tests.conftest import LORASWEEP, _free_port


def test_ui_command_binds_localhost_to_default_store(tmp_path: Path) -> None:
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    cmd = ui_command("outputs", None, "127.0.0.1", 5000)
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--backend-store-uri") + 1] == f"sqlite:///{Path('outputs/mlflow.db').resolve()}"


def test_ui_serves_the_store(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    store = tmp_path / "outputs"
    store.mkdir()
    MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}").create_experiment("ui-check")
    port = _free_port()
    proc = subprocess.Popen([*LORASWEEP, "ui", "--port", str(port)], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 90
        body = None
        while time.time() < deadline and proc.poll() is None:
            try:
                url = f"http://127.0.0.1:{port}/ajax-api/2.0/mlflow/experiments/search?max_results=10"
                with urllib.request.urlopen(url, timeout=2) as response:
                    body = json.loads(response.read())
                    break
            except OSError:
                time.sleep(0.5)
        assert body is not None, "the UI did not answer"
        assert "ui-check" in {e["name"] for e in body["experiments"]}
        # Without --host it listens on the loopback address only (/proc/net/tcp: local address, state 0A = LISTEN).
        listening = [fields[1] for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
                     if (fields := line.split())[3] == "0A" and fields[1].endswith(f":{port:04X}")]
        assert listening and set(listening) == {f"0100007F:{port:04X}"}, listening
        assert not [line for line in Path("/proc/net/tcp6").read_text().splitlines()[1:]
                    if line.split()[3] == "0A" and line.split()[1].endswith(f":{port:04X}")]
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)

"""``python -m tune_cifar.dashboard STUDY``: a real optuna-dashboard server on 127.0.0.1, read over HTTP.

The study database is written with Optuna's own API in the layout a study leaves (``STUDY/optuna.db``,
one intermediate value per epoch, ASHA-stopped trials PRUNED, the Ray trial id as a user attribute),
so the test needs no Ray study run; what it checks is that the command serves that file and nothing else.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import optuna
import psutil
import pytest

from tune_cifar.study_folder import StudyFolder

REPO = Path(__file__).resolve().parents[1]
# (state, validation accuracy per epoch): two ran all 3 epochs, one was stopped by ASHA after 1, one failed
TRIALS = [
    (optuna.trial.TrialState.COMPLETE, [0.30, 0.42, 0.51]),
    (optuna.trial.TrialState.PRUNED, [0.12]),
    (optuna.trial.TrialState.COMPLETE, [0.25, 0.33, 0.47]),
    (optuna.trial.TrialState.FAIL, []),
]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_study(folder: Path, name: str = "smoke") -> optuna.Study:
    folder.mkdir(parents=True)
    study = optuna.create_study(study_name=name, storage=StudyFolder(folder).optuna_url, direction="maximize")
    for number, (state, curve) in enumerate(TRIALS):
        trial = study.ask({"lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)})
        trial.set_user_attr("ray_trial_id", f"ray{number:04d}")
        for epoch, value in enumerate(curve, start=1):
            trial.report(value, epoch)
        # as the project's searcher tells them: Optuna gives a PRUNED trial its last intermediate value
        study.tell(trial, curve[-1] if state == optuna.trial.TrialState.COMPLETE else None, state=state)
    return study


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def dashboard(*args: str) -> list[str]:
    return [sys.executable, "-m", "tune_cifar.dashboard", *args]


def test_serves_the_study_database_on_loopback(tmp_path: Path) -> None:
    pytest.importorskip("optuna_dashboard", reason="the dashboard extra: pip install -e '.[dashboard]'")
    study_dir = tmp_path / "smoke"
    study = make_study(study_dir)
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    server = subprocess.Popen(dashboard(str(study_dir), "--port", str(port)), cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, server.communicate()[1][-2000:]
            try:
                summaries = get_json(f"http://127.0.0.1:{port}/api/studies")["study_summaries"]
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, "the dashboard never answered"
                time.sleep(0.3)
        assert [s["study_name"] for s in summaries] == ["smoke"]
        detail = get_json(f"http://127.0.0.1:{port}/api/studies/{summaries[0]['study_id']}")
        served = sorted(detail["trials"], key=lambda t: t["number"])
        expected = study.get_trials(deepcopy=False)
        assert len(served) == len(expected) == len(TRIALS)
        for mine, theirs in zip(expected, served, strict=True):
            assert theirs["state"] == mine.state.name.capitalize()  # Complete, Pruned, Fail
            assert (theirs.get("values") or [None])[0] == pytest.approx(mine.value)
            assert {v["step"]: v["value"] for v in theirs["intermediate_values"]} == pytest.approx(
                mine.intermediate_values
            )
            assert {a["key"]: a["value"] for a in theirs["user_attrs"]} == mine.user_attrs
        # bound to the loopback address only, not to every interface
        listening = [c.laddr for c in psutil.Process(server.pid).net_connections() if c.status == psutil.CONN_LISTEN]
        assert listening == [("127.0.0.1", port)]
        server.send_signal(signal.SIGINT)  # Ctrl-C: the way to stop it, so a clean exit
        out, err = server.communicate(timeout=30)
        assert server.returncode == 0, err[-2000:]
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()
    url = f"http://127.0.0.1:{port}/dashboard"
    assert out.splitlines()[0] == f"optuna-dashboard for {StudyFolder(study_dir).optuna_db} at {url} (Ctrl-C stops it)"
    assert err == ""  # no line per request


@pytest.mark.parametrize("make", [False, True], ids=["no-folder", "folder-without-optuna-db"])
def test_a_folder_without_optuna_db_is_one_line_and_exit_2(tmp_path: Path, make: bool) -> None:
    folder = tmp_path / "not-a-study"
    if make:
        (folder / "trials").mkdir(parents=True)
    done = subprocess.run(dashboard(str(folder)), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    expected = StudyFolder(folder).optuna_db
    assert done.stderr.strip() == f"error: {folder}: no optuna.db (expected {expected}); " \
        "is this a tune-cifar study folder?"  # fmt: skip
    assert done.stdout == ""


def test_without_optuna_dashboard_it_says_how_to_install_it(tmp_path: Path) -> None:
    """A Python that cannot import optuna_dashboard (a shadowing module that raises ImportError)."""
    make_study(tmp_path / "smoke")
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "optuna_dashboard.py").write_text("raise ImportError('not installed')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shadow), str(REPO)])}
    done = subprocess.run(dashboard(str(tmp_path / "smoke")), cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip() == "error: optuna-dashboard is not installed: pip install -e '.[dashboard]'"


def test_a_port_in_use_is_one_line_and_exit_2(tmp_path: Path) -> None:
    make_study(tmp_path / "smoke")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(dashboard(str(tmp_path / "smoke"), "--port", str(port)), cwd=REPO, capture_output=True,
                              text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2 and done.stdout == ""  # no address printed that would not answer
    line = f"error: --port {port}: cannot serve on 127.0.0.1:{port} (Address already in use)"
    assert done.stderr.strip().splitlines() == [line]

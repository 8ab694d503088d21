"""The one launcher of service processes (rlhf_online.launch): failures say why, stop escalates to SIGKILL."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from rlhf_online import launch


def test_a_service_that_exits_at_start_is_reported_with_the_tail_of_its_log(tmp_path):
    with pytest.raises(launch.ServiceStartError, match="generation service exited with code 2") as e:
        launch.start("generation", {}, tmp_path, flags=["--max-batch-size", "0"], ready_timeout=60)
    message = str(e.value)
    assert str(tmp_path / "generation.log") in message
    assert "max_batch_size" in message and "--max-batch-size" in message  # the service's own words, from its log


def test_a_service_not_serving_in_time_is_stopped_and_reported(tiny_model_dir, tmp_path, monkeypatch):
    started: list[subprocess.Popen] = []
    real_popen = subprocess.Popen

    def popen(*args, **kwargs):
        started.append(real_popen(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(launch.subprocess, "Popen", popen)
    with pytest.raises(launch.ServiceStartError, match="did not report SERVING within 0.01 s"):
        launch.start("generation", {"RLHF_BASE_MODEL": str(tiny_model_dir), "RLHF_DATA_DIR": str(tmp_path)},
                     tmp_path, ready_timeout=0.01)
    [proc] = started
    assert proc.poll() is not None  # not left running


def test_stop_kills_a_service_that_ignores_sigterm(tmp_path):
    script = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); "
              "time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n"  # SIGTERM is ignored from here on
    service = launch.Service("stubborn", proc, 0, tmp_path / "stubborn.log")
    assert service.stop(timeout=0.5) == -signal.SIGKILL
    proc.stdout.close()

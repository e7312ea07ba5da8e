"""`make sweep`'s queue run: it ends when DVC's process ends, whatever its daemon workers do, and keeps the output."""

import sys
import time

from cvae_pipeline.commands import sweep as sweep_queue

# Like `dvc exp run --run-all`: prints, leaves a daemon behind that holds the same output open and writes later, exits.
LEAVES_A_DAEMON = """
import subprocess, sys
print("experiment done", flush=True)
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30); print('worker stopped', flush=True)"],
                 start_new_session=True)
sys.exit({status})
"""


def test_the_run_ends_with_the_command_not_with_the_daemons_it_left(tmp_path, capfd):
    log = tmp_path / "tmp" / "sweep.log"
    started = time.monotonic()
    status = sweep_queue.run_following([sys.executable, "-c", LEAVES_A_DAEMON.format(status=3)], log, 0.05)
    assert time.monotonic() - started < 20  # not the daemon's 30 s
    assert status == 3
    assert "experiment done" in capfd.readouterr().out
    assert log.read_text() == "experiment done\n"


def test_a_failed_experiment_fails_the_sweep_naming_what_to_run(tmp_path, monkeypatch, capsys):
    def dvc_says(text):
        def fake_run(command, log, poll_seconds=0.5):
            assert command[:4] == ["dvc", "exp", "run", "--run-all"] and command[-2:] == ["-j", "2"]
            log.write_text(text)
            return 0
        return fake_run

    monkeypatch.setattr(sweep_queue, "run_following", dvc_says("ERROR: Failed to reproduce experiment(s) 'a-b'\n"))
    assert sweep_queue.main(["--jobs", "2", "--log", str(tmp_path / "log")]) == 1
    assert "dvc queue logs" in capsys.readouterr().err
    monkeypatch.setattr(sweep_queue, "run_following", dvc_says("Ran experiment(s): a-b\n"))
    assert sweep_queue.main(["--jobs", "2", "--log", str(tmp_path / "log")]) == 0

"""`make sweep`'s run of the queue: `dvc exp run --run-all` with its output in a log file, shown as it grows.

DVC starts its queue workers as daemons that inherit the command's output. Through a pipe (`| tee log`), a sweep lasts
as long as the last worker lives, and a worker that DVC fails to stop (its monitor can judge the queue empty while its
task still runs, and the shutdown it sends never arrives) holds it forever. A file has no reader to wait for: the
output is followed until DVC's own process exits, which it does once every experiment's result is collected.
"""

import argparse
import subprocess
import sys
import time
from pathlib import Path

FAILED = "Failed to reproduce"  # what `dvc exp run --run-all` prints, exiting 0 all the same, when one failed


def run_following(command: list[str], log: Path, poll_seconds: float = 0.5) -> int:
    """Run `command` with its output (stdout and stderr) written to `log` and copied to this process's stdout
    while it runs; its exit status, without waiting for the processes it left behind."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as sink, open(log, "rb") as source:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            while True:
                finished = process.poll() is not None
                sys.stdout.buffer.write(source.read())  # what it wrote since the last look
                sys.stdout.buffer.flush()
                if finished:
                    return process.returncode
                time.sleep(poll_seconds)
        except KeyboardInterrupt:  # the terminal's Ctrl-C reached DVC too: it says what goes on in the background
            process.wait()
            sys.stdout.buffer.write(source.read())
            return 130


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2, help="queue workers (no more than cores)")
    parser.add_argument("--log", type=Path, required=True, help="where the whole output is kept")
    args = parser.parse_args(argv)
    status = run_following(["dvc", "exp", "run", "--run-all", "-j", str(args.jobs)], args.log)
    if status == 0 and FAILED in args.log.read_text(errors="replace"):
        print("make sweep: an experiment failed; see why with dvc queue logs <name>", file=sys.stderr)
        return 1
    return status


if __name__ == "__main__":
    sys.exit(main())

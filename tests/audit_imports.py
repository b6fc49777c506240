"""python audit_imports.py LOG SCRIPT ARGS...: runs the console script SCRIPT in this very
process (signals, exit code and all as if run alone) with an audit hook that appends the
name of every module imported from then on to LOG, one a line, after the ones already
loaded: what a test may ask of a real process's imports without changing how it runs."""

import os
import runpy
import sys

log_path, script, *script_args = sys.argv[1:]
# open for the process's life, line-buffered: a killed process's imports are written too
log = open(log_path, "a", buffering=1)  # noqa: SIM115
log.writelines(f"{name}\n" for name in sorted(sys.modules))


def record(event: str, args: tuple) -> None:  # type: ignore[type-arg]
    if event == "import":
        log.write(f"{args[0]}\n")


sys.addaudithook(record)
sys.argv = [script, *script_args]
sys.path[0] = os.path.dirname(script)  # as if SCRIPT ran itself: not this tests/ directory
runpy.run_path(script, run_name="__main__")

"""``python -m hypernet ARGS`` run inside the test process, for the many cases that only check a one-line error.

It calls the function ``python -m hypernet`` calls (hypernet/__main__.py): ``main`` of the pack's own
``hypernet.cli``, imported once under the package name ``import_pack()`` gives, never the top-level ``hypernet``
copy, so the error classes the command catches are the ones a real run has. stdout, stderr and the exit code come
back as ``subprocess.run`` gives them; an exception the command does not catch is printed as a traceback with exit
code 1, as the interpreter would. Each command keeps tests through a real process for the entry point itself.
"""

import contextlib
import importlib
import io
import os
import subprocess
import sys
import traceback

from hypernet.__main__ import import_pack


def _set_environment(values: dict[str, str | None]) -> None:
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def run_in_process(*args, env: dict[str, str | None] | None = None) -> subprocess.CompletedProcess:
    """Run the command line on ``args`` with ``env`` (a value of None: unset) applied for the call only."""
    argv = [str(arg) for arg in args]
    main = importlib.import_module(f"{import_pack().__name__}.hypernet.cli").main
    env = env or {}
    saved = {name: os.environ.get(name) for name in env}
    stdout, stderr = io.StringIO(), io.StringIO()
    _set_environment(env)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                code = main(argv)
            except SystemExit as done:  # argparse's usage errors and --help, as the interpreter reports sys.exit
                if done.code is None or isinstance(done.code, int):
                    code = done.code or 0
                else:
                    print(done.code, file=sys.stderr)
                    code = 1
            except Exception:  # what the interpreter does with an uncaught exception
                traceback.print_exc()
                code = 1
    finally:
        _set_environment(saved)
    return subprocess.CompletedProcess(["python", "-m", "hypernet", *argv], code, stdout.getvalue(), stderr.getvalue())

"""Run an entry point exactly as ``python -m MODULE ARGS`` does, in this process, and capture its exit.

``run_module_cli`` executes the module's ``if __name__ == "__main__":`` block through ``runpy`` with
``sys.argv`` set, so what is tested is the command-line edge itself (``utils.errors.run_cli``), not
``main()`` called as a function. It returns the exit code and what went to stderr; a traceback in
stderr means the entry point let a user's mistake escape as an exception. (Each entry point also offers
``cli(argv) -> int``, which that block calls; ``tests/test_cli_errors.py`` checks the two agree.)
"""

from __future__ import annotations

import contextlib
import io
import runpy
import sys
import warnings
from dataclasses import dataclass


@dataclass
class CliResult:
    code: int
    stderr: str
    stdout: str

    @property
    def lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]

    def error_line(self) -> str:
        """The single ``error: ...`` line a user mistake must produce (asserts there is exactly one)."""
        errors = [line for line in self.lines if line.startswith("error: ")]
        assert len(errors) == 1, f"expected one 'error:' line, got stderr:\n{self.stderr}"
        assert "Traceback" not in self.stderr, self.stderr
        return errors[0]


def run_module_cli(module: str, *args: str) -> CliResult:
    """``python -m module *args`` in-process: exit code (0 when it returns), stderr, stdout."""
    err, out = io.StringIO(), io.StringIO()
    old_argv = sys.argv
    sys.argv = [module, *map(str, args)]
    code = 0
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*found in sys.modules after import of package",
                                    category=RuntimeWarning)
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exit_:
        if isinstance(exit_.code, str):
            err.write(exit_.code + "\n")
            code = 1
        else:
            code = exit_.code or 0
    finally:
        sys.argv = old_argv
    return CliResult(code=code, stderr=err.getvalue(), stdout=out.getvalue())


def assert_user_error(result: CliResult, *fragments: str) -> str:
    """Exit status 2, one ``error:`` line, no traceback, and every fragment in that line."""
    assert result.code == 2, f"exit code {result.code}, stderr:\n{result.stderr}"
    line = result.error_line()
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    return line

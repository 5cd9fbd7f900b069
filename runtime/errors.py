"""User-facing errors: what was expected, what was given, and how to fix it.

Both `sdcompile` and `sdrun` raise `UserError` for mistakes a user can correct; the
CLIs print it without a traceback and exit with `UserError.exit_code`. Any other exception is a
bug: one line naming the stage (see `stage`), the traceback in a log file, exit 1.
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

USAGE_EXIT_CODE = 2


class UserError(Exception):
    """A mistake in what the user gave us (input, file, option), with the fix."""

    exit_code = USAGE_EXIT_CODE

    def __init__(self, problem: str, *, expected: str | None = None, got: str | None = None,
                 fix: str | None = None):
        self.problem, self.expected, self.got, self.fix = problem, expected, got, fix
        super().__init__(self.message())

    def message(self) -> str:
        lines = [self.problem]
        if self.expected is not None:
            lines.append(f"  expected: {self.expected}")
        if self.got is not None:
            lines.append(f"  got:      {self.got}")
        if self.fix is not None:
            lines.append(f"  fix:      {self.fix}")
        return "\n".join(lines)


class MissingDependencyError(UserError):
    """An optional package (TensorRT, onnxruntime, torch) is needed but not installed."""

    def __init__(self, package: str, purpose: str, install: str):
        super().__init__(f"{package} is required {purpose} but is not installed.",
                         fix=f"install it with: {install}")
        self.package = package


INTERNAL_EXIT_CODE = 1
INTERRUPTED_EXIT_CODE = 130
DEBUG_FLAG = "--debug"
DEBUG_ENV = "SDCOMPILE_DEBUG"  # any value but "" or "0" prints tracebacks
LOG_DIR_ENV = "SDCOMPILE_LOG_DIR"  # where internal-error logs go [default: $XDG_CACHE_HOME/sdcompile/logs]
STAGE_ATTRIBUTE = "sdcompile_stage"
MESSAGE_CHARS = 300  # of the exception's first line, in the one-line report


@contextlib.contextmanager
def stage(name: str):
    """Label an unexpected exception raised inside with the stage it came from (the innermost wins)."""
    try:
        yield
    except UserError:
        raise
    except Exception as err:
        if not hasattr(err, STAGE_ATTRIBUTE):
            setattr(err, STAGE_ATTRIBUTE, name)
        raise


def debug_option():
    """The `--debug` flag both CLIs' groups accept; `run_cli` reads it from the arguments."""
    import click

    return click.option(DEBUG_FLAG, is_flag=True, help="print the traceback of an internal error "
                        "(it is always written to a log file)")


def debug_requested(args: list[str]) -> bool:
    return DEBUG_FLAG in args or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def internal_error_line(err: BaseException, prog: str, log: Path | None) -> str:
    """`error: internal error while <stage>: <Type>: <message> — this is a bug; …` on one line."""
    where = getattr(err, STAGE_ATTRIBUTE, f"running {prog}")
    text = (str(err).strip().splitlines() or [""])[0][:MESSAGE_CHARS]
    detail = f"{type(err).__name__}: {text}" if text else type(err).__name__
    logged = f"the traceback is in {log}" if log else "no log file could be written"
    return (f"error: internal error while {where}: {detail} — this is a bug; {logged} "
            f"(rerun with {DEBUG_FLAG} to print it)")


def write_error_log(prog: str, args: list[str], report: str) -> Path | None:
    """The full report in a new file under the log directory; None when no directory is writable."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for directory in _log_directories():
        try:
            directory.mkdir(parents=True, exist_ok=True)
            path = directory / f"{prog}-{stamp}-{os.getpid()}.log"
            path.write_text(f"{prog} {' '.join(args)}\n{report}")
            return path
        except OSError:
            continue
    return None


def _log_directories() -> list[Path]:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    configured = [Path(os.environ[LOG_DIR_ENV])] if os.environ.get(LOG_DIR_ENV) else []
    return configured + [cache / "sdcompile" / "logs", Path(tempfile.gettempdir()) / "sdcompile-logs"]


def run_cli(group, args: list[str] | None = None) -> None:
    """Run a click group. A UserError prints its message and exits 2; an unexpected exception prints one
    line naming the stage, writes the traceback to a log file (and to stderr with --debug) and exits 1."""
    import click

    args = list(sys.argv[1:] if args is None else args)
    prog = group.name or "sdcompile"
    try:
        group.main(args=args, prog_name=prog, standalone_mode=False)
    except UserError as err:
        click.echo(f"error: {err.message()}", err=True)
        sys.exit(err.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("aborted", err=True)
        sys.exit(INTERRUPTED_EXIT_CODE)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except click.exceptions.Exit as exit_:
        sys.exit(exit_.exit_code)
    except Exception as err:
        report = traceback.format_exc()
        log = write_error_log(prog, args, report)
        if debug_requested(args):
            sys.stderr.write(report)
        click.echo(internal_error_line(err, prog, log), err=True)
        sys.exit(INTERNAL_EXIT_CODE)

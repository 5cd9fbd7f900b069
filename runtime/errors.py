"""User-facing errors: what was expected, what was given, and how to fix it.

Both `sdcompile` and `sdrun` raise `UserError` for mistakes a user can correct; the
CLIs print it without a traceback and exit with `UserError.exit_code`.
"""
from __future__ import annotations

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


def run_cli(group, args=None) -> None:
    """Run a click group; a UserError becomes a message on stderr and its exit code, no traceback."""
    import sys

    import click

    try:
        group.main(args=args, standalone_mode=False)
    except UserError as err:
        click.echo(f"error: {err.message()}", err=True)
        sys.exit(err.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)

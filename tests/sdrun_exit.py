"""`sdrun` run in the test's process through its real entry point, as a user's shell would see it."""
from __future__ import annotations


def sdrun(capsys, *args) -> tuple[int, str]:
    """(exit code, stderr) of `sdrun ARGS`, click's own errors included; earlier captured output is dropped."""
    from sdrun.cli import main

    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exit_:
        code = exit_.code or 0
    return code, capsys.readouterr().err

"""Internal errors in either CLI: one line naming the stage, exit 1, the traceback in a log file."""
from __future__ import annotations

import re

import pytest

from sdrun.errors import INTERNAL_EXIT_CODE, LOG_DIR_ENV

LINE = re.compile(r"^error: internal error while (?P<stage>.+?): (?P<detail>.+) — this is a bug; "
                  r"the traceback is in (?P<log>\S+) \(rerun with --debug to print it\)$")


def failing(*_args, **_kwargs):
    raise RuntimeError("forced failure\nsecond line of the message")


def run_failing(main, args, capsys) -> tuple[re.Match, str]:
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == INTERNAL_EXIT_CODE
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    match = LINE.match(errors[0])
    assert match, errors[0]
    return match, stderr


@pytest.fixture
def log_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(LOG_DIR_ENV, str(tmp_path / "logs"))
    monkeypatch.delenv("SDCOMPILE_DEBUG", raising=False)
    return tmp_path / "logs"


def test_sdcompile_export_internal_error_is_one_line_with_a_log(tmp_path, log_dir, monkeypatch, capsys):
    from sdcompile import bundler
    from sdcompile.cli import main

    monkeypatch.setattr(bundler, "load_models", failing)
    args = ["export", "--recipe", "tiny", "--random-weights", "--out", str(tmp_path / "bundle")]
    match, stderr = run_failing(main, args, capsys)
    assert match["stage"] == "loading the weights"
    assert match["detail"] == "RuntimeError: forced failure"
    assert "Traceback" not in stderr
    log = match["log"]
    assert log.startswith(str(log_dir)) and "Traceback" in open(log).read()
    assert not (tmp_path / "bundle").exists()


def test_debug_prints_the_traceback(tmp_path, log_dir, monkeypatch, capsys):
    from sdcompile import bundler
    from sdcompile.cli import main

    monkeypatch.setattr(bundler, "load_models", failing)
    _, stderr = run_failing(main, ["--debug", "export", "--recipe", "tiny", "--random-weights",
                                   "--out", str(tmp_path / "bundle")], capsys)
    assert "Traceback (most recent call last)" in stderr and "forced failure" in stderr


def test_sdrun_internal_error_names_the_stage(tiny_bundle, tmp_path, log_dir, monkeypatch, capsys):
    from sdrun import pipeline
    from sdrun.cli import main

    monkeypatch.setattr(pipeline.Pipeline, "generate", failing)
    args = ["txt2img", "--bundle", str(tiny_bundle), "--prompt", "x", "--backend", "onnxruntime",
            "--out", str(tmp_path / "out.png")]
    match, _ = run_failing(main, args, capsys)
    assert match["stage"] == "generating"
    assert not (tmp_path / "out.png").exists()


def test_user_errors_keep_exit_code_2_and_no_log(tmp_path, log_dir, capsys):
    from sdcompile.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["export", "--recipe", "no-such-recipe", "--random-weights", "--out", str(tmp_path / "b")])
    assert exit_.value.code == 2
    assert "internal error" not in capsys.readouterr().err
    assert not log_dir.exists()

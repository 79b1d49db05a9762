"""The CLI: help without heavy imports, one-line errors without traceback."""
import subprocess
import sys

from cic_gpt2.cli import COMMANDS, main


def test_help_lists_every_command(capsys):
    try:
        main(["--help"])
    except SystemExit as e:
        assert e.code == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_unknown_command_exits_2():
    proc = subprocess.run([sys.executable, "-m", "cic_gpt2", "frobnicate"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "invalid choice" in proc.stderr


def test_user_error_is_one_line_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "cic_gpt2", "prepare", str(tmp_path / "missing.csv"), "--output", str(tmp_path / "o")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip() and "warn" not in l.lower()]
    assert len(lines) == 1 and "missing.csv" in lines[0], proc.stderr


def test_train_help_lists_every_config_key_with_type_and_default(capsys):
    from cic_gpt2.config_doc import config_keys

    try:
        main(["train", "--help"])
    except SystemExit as e:
        assert e.code == 0
    out = capsys.readouterr().out
    assert "config keys (set with KEY=VALUE" in out
    for line in ("  train.lr (float, default 0.0005)", "  checkpoint.every_steps (int, default 0)",
                 "  data.max_length (Optional[int], default null)", "  dist.timeout_s (float, default 600.0)"):
        assert line in out, line
    for key in config_keys():
        assert f"  {key.key} (" in out, key.key

"""`prompt-server` argument handling: every Settings field is a flag, env vars fill the rest, bench is forwarded."""

from __future__ import annotations

import pytest

from prompt_server.cli import build_parser, main, settings_from_args
from prompt_server.config import Settings


def test_every_setting_is_a_flag_naming_its_env_var():
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    helps = {a.dest: a.help for a in serve._actions}
    for name in Settings.model_fields:
        assert name in helps, f"--{name.replace('_', '-')} is missing"
        assert f"PROMPT_SERVER_{name.upper()}" in helps[name]


def test_flags_override_env_and_env_fills_the_rest(monkeypatch, tmp_path):
    monkeypatch.setenv("PROMPT_SERVER_MAX_QUEUE", "7")
    monkeypatch.setenv("PROMPT_SERVER_PORT", "9999")
    args = build_parser().parse_args(
        ["serve", "--model", str(tmp_path), "--adapters", str(tmp_path / "store"), "--port", "8123",
         "--request-timeout", "2.5", "--dtype", "float32", "--api-key", "k"]
    )
    s = settings_from_args(args)
    assert s.port == 8123 and s.max_queue == 7 and s.request_timeout == 2.5
    assert s.model == str(tmp_path) and s.adapters == tmp_path / "store" and s.dtype == "float32"
    assert s.api_key == "k" and s.admin_key is None
    assert settings_from_args(build_parser().parse_args(["serve"])).model is None  # the embedded default


def test_bad_flag_values_are_rejected(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--dtype", "float64"])
    assert "float64" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--max-queue", "many"])


def test_bench_arguments_are_forwarded(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--help"])
    assert exc.value.code == 0
    assert "prompt-server bench" in capsys.readouterr().out


def test_adapters_commands_report_unreachable_server(capsys, tmp_path):
    assert main(["adapters", "list", "--url", "http://127.0.0.1:9"]) == 1
    assert "cannot reach" in capsys.readouterr().err
    assert main(["adapters", "push", "x", str(tmp_path / "missing"), "--url", "http://127.0.0.1:9"]) == 1
    assert "neither a PEFT adapter directory nor an archive" in capsys.readouterr().err


def test_an_empty_key_is_refused_at_start_up():
    """An empty key would lock every client out (an empty token never matches): refused, naming the setting."""
    import pydantic
    import pytest

    from prompt_server.config import Settings

    for name in ("api_key", "admin_key"):
        with pytest.raises(pydantic.ValidationError, match=name):
            Settings(**{name: ""})

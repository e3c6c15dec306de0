"""`claas openclaw config`: the openclaw.json it writes points a custom provider at CLaaS's /v1 with the lora_ids
as models, carries the headless settings, keeps secrets out of the file, and OpenClaw 2026.9.6 itself accepts it
(`openclaw config validate`). The live tests start their gateway with this command's output too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from claas.cli import app
from claas.openclaw import OpenClawSetup, build_config
from tests.openclaw.conftest import PLUGIN, OpenClawInstall

runner = CliRunner()


def _write(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "openclaw.json"
    result = runner.invoke(app, ["openclaw", "config", *args, "-o", str(out)])
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text())


def test_provider_models_and_headless_settings(tmp_path: Path) -> None:
    config = _write(tmp_path, "--lora-id", "alice/assistant", "--lora-id", "bob/assistant",
                    "--claas-url", "http://claas-api:8080")
    provider = config["models"]["providers"]["claas"]
    assert provider["baseUrl"] == "http://claas-api:8080/v1" and provider["api"] == "openai-completions"
    assert [model["id"] for model in provider["models"]] == ["alice/assistant", "bob/assistant"]
    assert all(model["compat"] == {"supportsTools": False} for model in provider["models"])
    assert config["agents"]["defaults"] == {"model": {"primary": "claas/alice/assistant"}, "skipBootstrap": True}
    assert config["gateway"]["mode"] == "local" and config["gateway"]["bind"] == "loopback"
    assert config["gateway"]["http"]["endpoints"]["chatCompletions"]["enabled"] is True
    assert config["models"]["catalogRefresh"]["enabled"] is False and config["update"]["checkOnStart"] is False
    assert config["tools"] == {"profile": "minimal"}
    assert "plugins" not in config and "channels" not in config
    assert os.stat(tmp_path / "openclaw.json").st_mode & 0o077 == 0  # may hold keys: owner-only


def test_no_secret_in_the_file_unless_given(tmp_path: Path) -> None:
    config = _write(tmp_path, "--lora-id", "alice/assistant", "--telegram", "--api-key-env", "CLAAS_API_KEY",
                    "--plugin", str(PLUGIN))
    assert config["gateway"]["auth"] == {"mode": "token", "token": "${OPENCLAW_GATEWAY_TOKEN}"}
    assert config["channels"]["telegram"]["botToken"] == "${TELEGRAM_BOT_TOKEN}"
    assert config["channels"]["telegram"]["dmPolicy"] == "pairing"
    assert config["models"]["providers"]["claas"]["apiKey"] == "${CLAAS_API_KEY}"
    entry = config["plugins"]["entries"]["claas-feedback"]
    assert entry["hooks"]["allowConversationAccess"] is True and entry["config"]["apiKey"] == "${CLAAS_API_KEY}"
    assert config["plugins"]["load"]["paths"] == [str(PLUGIN)]


def test_tools_and_telegram_allowlist() -> None:
    config = build_config(OpenClawSetup(lora_ids=["alice/assistant"], claas_url="http://x:8080/v1", tools=True,
                                        telegram=True, telegram_allow_from=["42"]))
    assert "tools" not in config and "skipBootstrap" not in config["agents"]["defaults"]
    assert config["models"]["providers"]["claas"]["baseUrl"] == "http://x:8080/v1"
    assert config["channels"]["telegram"] | {"botToken": ""} == {
        "enabled": True, "botToken": "", "dmPolicy": "allowlist", "allowFrom": ["42"]}


@pytest.mark.parametrize(("args", "named"), [
    (["--lora-id", "bad id"], "lora_id"),
    (["--lora-id", "a/b", "--claas-url", "claas:8080"], "--claas-url"),
    (["--lora-id", "a/b", "--max-tokens", "9000"], "--max-tokens"),
    (["--lora-id", "a/b", "--feedback-batch-size", "0"], "--feedback-batch-size"),
])
def test_bad_options_exit_2_naming_them(args: list[str], named: str) -> None:
    result = runner.invoke(app, ["openclaw", "config", *args])
    assert result.exit_code == 2 and named in result.output


@pytest.mark.slow
def test_openclaw_itself_accepts_the_config(openclaw_install: OpenClawInstall, tmp_path: Path) -> None:
    out = tmp_path / "openclaw.json"
    written = subprocess.run(
        [sys.executable, "-m", "claas", "openclaw", "config", "--lora-id", "alice/assistant", "--lora-id",
         "bob/assistant", "--plugin", str(PLUGIN), "--telegram", "--telegram-allow-from", "12345", "-o", str(out)],
        capture_output=True, text=True, timeout=120)
    assert written.returncode == 0, written.stderr
    env = {**os.environ, "HOME": str(tmp_path), "OPENCLAW_STATE_DIR": str(tmp_path / "state"),
           "OPENCLAW_CONFIG_PATH": str(out), "OPENCLAW_GATEWAY_TOKEN": "t", "TELEGRAM_BOT_TOKEN": "1:x"}

    def validate() -> dict:
        result = subprocess.run([str(openclaw_install.node), str(openclaw_install.entry), "config", "validate",
                                 "--json"], capture_output=True, text=True, env=env, timeout=120)
        return json.loads(result.stdout[result.stdout.index("{"):])

    assert validate()["valid"] is True
    broken = json.loads(out.read_text())
    broken["gateway"]["no_such_key"] = 1
    out.write_text(json.dumps(broken))
    assert validate()["valid"] is False  # the check can fail

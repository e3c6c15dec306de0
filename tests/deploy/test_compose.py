"""The docker stacks (docker/): every compose file is valid for `docker-compose config` (compose 1.29, Debian's) and
for the Compose Specification's JSON schema (vendored in compose_spec/, Apache-2.0), and is wired to what the code
reads: env names are CLaaS settings, the API and the inference server see the adapter store at the same path, ports
and healthchecks match the servers' routes, control endpoints stay on the compose network, the API is published on
localhost unless keys are set, images are pinned and run as non-root. There is no docker engine here: validation
is the test."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from claas.core.config import Settings
from claas.openclaw import DEFAULT_GATEWAY_PORT

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
SCHEMA = Path(__file__).parent / "compose_spec" / "compose-spec.json"
STACKS = {  # compose file -> the service that serves inference (None: the Tinker engine samples itself)
    "docker-compose.yml": "vllm",
    "docker-compose.cpu.yml": "model-server",
    "docker-compose.tinker.yml": None,
}
REQUIRED = {"TELEGRAM_BOT_TOKEN": "1:x", "OPENCLAW_GATEWAY_TOKEN": "t", "CLAAS_TINKER_API_KEY": "tml-x"}
# Env names of the scripts (init.sh, serve-api.sh), not settings of the API.
SCRIPT_VARS = {"CLAAS_API_BIND", "CLAAS_API_URL", "CLAAS_LORA_ID", "CLAAS_EXTRA_LORA_IDS", "CLAAS_API_KEY"}
_VAR = re.compile(r"\$\{([A-Z0-9_]+)(?:(:?[-?])([^}]*))?\}")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's interpolation: ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match[str]) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3)
        current = env.get(name)
        if op in (":-", "-"):
            return current if current or (op == "-" and current is not None) else arg
        if op in (":?", "?"):
            if not current:
                raise KeyError(f"{name}: {arg}")
            return current
        return current or ""

    return _VAR.sub(one, value)


def load(name: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    raw = yaml.safe_load((DOCKER / name).read_text())
    return interpolate(raw, {**REQUIRED, **(env or {})})


def service_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    return {str(k): str(v) for k, v in env.items()}


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """volume name -> container path (named volumes only)."""
    out = {}
    for spec in service.get("volumes") or ():
        source, target = spec.split(":")[:2]
        out[source] = target
    return out


@pytest.mark.parametrize("name", STACKS)
def test_matches_the_compose_specification_schema(name: str) -> None:
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.validate(load(name), schema)
    broken = load(name)
    broken["services"]["api"]["healthcheck"]["intervall"] = "15s"
    with pytest.raises(jsonschema.ValidationError):  # the check can fail
        jsonschema.validate(broken, schema)


@pytest.mark.parametrize("name", STACKS)
def test_docker_compose_config_accepts_it(name: str, tmp_path: Path) -> None:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed (apt-get install docker-compose gives compose 1.29)")
    env_file = tmp_path / "test.env"
    env_file.write_text("".join(f"{key}={value}\n" for key, value in REQUIRED.items()))
    clean = {key: value for key, value in os.environ.items() if key not in REQUIRED}
    ok = subprocess.run([binary, "--env-file", str(env_file), "-f", str(DOCKER / name), "config"],
                        capture_output=True, text=True, env=clean, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert set(yaml.safe_load(ok.stdout)["services"]) >= {"api", "init", "openclaw"}
    env_file.write_text("".join(f"{key}={value}\n" for key, value in REQUIRED.items() if key != "TELEGRAM_BOT_TOKEN"))
    missing = subprocess.run([binary, "--env-file", str(env_file), "-f", str(DOCKER / name), "config"],
                             capture_output=True, text=True, env=clean, timeout=120)
    assert missing.returncode != 0 and "TELEGRAM_BOT_TOKEN" in missing.stderr  # no default secret


@pytest.mark.parametrize(("name", "inference"), STACKS.items())
def test_wiring_agrees_with_the_settings_the_code_reads(name: str, inference: str | None) -> None:
    stack = load(name)
    services = stack["services"]
    api, init, openclaw = services["api"], services["init"], services["openclaw"]
    api_env = service_env(api)

    fields = {f"CLAAS_{field.upper()}" for field in Settings.model_fields}
    for service in services.values():
        for key in service_env(service):
            if key.startswith("CLAAS_"):
                assert key in fields or key in SCRIPT_VARS, f"{name}: {key} is no CLaaS setting"
    settings = Settings.model_validate({key.removeprefix("CLAAS_").lower(): value for key, value in api_env.items()
                                        if key in fields and value != ""})

    # Named volumes: declared, and the adapter store / feedback log are where the settings point.
    declared = set(stack["volumes"])
    for service in services.values():
        assert set(mounts(service)) <= declared
    api_mounts = mounts(api)
    assert api_mounts["claas-loras"] == str(settings.lora_root)
    assert api_mounts["claas-feedback"] == str(settings.feedback_log_dir)
    if inference is not None:
        server = services[inference]
        host, port = settings.vllm_base_url.removeprefix("http://").split(":")
        assert host == inference
        assert port in [str(p) for p in server["expose"]] and f"--port={port}" in _flags(server)
        assert "ports" not in server  # /sleep, /wake_up, adapter loading: compose network only
        assert mounts(server)["claas-loras"] == str(settings.lora_root)  # adapters load by the API's paths
        assert ":ro" in next(v for v in server["volumes"] if v.startswith("claas-loras:"))
        assert f"http://127.0.0.1:{port}/health" in server["healthcheck"]["test"][-1]
        assert api["depends_on"][inference]["condition"] == "service_healthy"
    else:
        assert settings.training_engine == "tinker" and settings.tinker_api_key is not None

    # The API: published on localhost by default, health on its real route, port of serve-api.sh.
    assert api["ports"] == ["127.0.0.1:8080:8080"] and api_env["CLAAS_API_BIND"] == "127.0.0.1"
    assert "--port 8080" in (DOCKER / "serve-api.sh").read_text()
    assert api["healthcheck"]["test"][-1] == "http://127.0.0.1:8080/v1/health"
    assert init["depends_on"]["api"]["condition"] == "service_healthy"
    assert service_env(init)["CLAAS_API_URL"] == "http://api:8080"

    # OpenClaw reads the config init writes, on the gateway port the config sets.
    config_path = service_env(init)["OPENCLAW_CONFIG"]
    assert mounts(init)["openclaw-config"] == mounts(openclaw)["openclaw-config"] == str(Path(config_path).parent)
    assert f"OPENCLAW_CONFIG_PATH={config_path}" in (DOCKER / "openclaw" / "Dockerfile").read_text()
    assert openclaw["depends_on"]["init"]["condition"] == "service_completed_successfully"
    assert openclaw["ports"] == [f"127.0.0.1:{DEFAULT_GATEWAY_PORT}:{DEFAULT_GATEWAY_PORT}"]
    assert f"127.0.0.1:{DEFAULT_GATEWAY_PORT}/v1/models" in openclaw["healthcheck"]["test"][-1]
    for service in services.values():
        assert service.get("healthcheck") or service is init, "every long-running service has a healthcheck"


def _flags(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    if isinstance(command, list) and command and command[0] == "claas":  # claas model-server --port 8000
        return [f"{a}={b}" for a, b in zip(command, command[1:]) if a.startswith("--")]
    return list(command)


def test_vllm_runs_with_what_the_gateway_needs() -> None:
    vllm = load("docker-compose.yml")["services"]["vllm"]
    flags = _flags(vllm)
    assert {"--enable-lora", "--enable-sleep-mode"} <= set(flags)
    env = service_env(vllm)
    assert env["VLLM_SERVER_DEV_MODE"] == "1" and env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] in ("1", "True")
    rank = int(next(f for f in flags if f.startswith("--max-lora-rank=")).split("=")[1])
    assert rank in (8, 16, 32, 64, 128, 256, 320, 512) and rank >= Settings().lora_rank  # vLLM's allowed ranks
    assert vllm["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert re.fullmatch(r"vllm/vllm-openai:v\d+\.\d+\.\d+", vllm["image"])  # pinned


def test_api_refuses_an_open_bind_without_keys(tmp_path: Path) -> None:
    env = {"PATH": os.environ["PATH"], "CLAAS_API_BIND": "0.0.0.0"}
    refused = subprocess.run(["sh", str(DOCKER / "serve-api.sh")], capture_output=True, text=True, env=env,
                             timeout=30)
    assert refused.returncode == 64 and "CLAAS_API_KEYS" in refused.stderr
    stub = tmp_path / "claas"  # stands in for the real CLI: shows what would be exec'd
    stub.write_text("#!/bin/sh\necho claas \"$@\"\n")
    stub.chmod(0o755)
    opened = subprocess.run(["sh", str(DOCKER / "serve-api.sh")], capture_output=True, text=True, timeout=30,
                            env={**env, "PATH": f"{tmp_path}:{env['PATH']}", "CLAAS_API_KEYS": "k"})
    assert opened.returncode == 0 and opened.stdout.strip() == "claas api --host 0.0.0.0 --port 8080"


DOCKERFILES = ["Dockerfile.cpu", "Dockerfile.cuda", "Dockerfile.tinker", "openclaw/Dockerfile"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_images_are_pinned_non_root_with_a_healthcheck_and_no_secret(dockerfile: str) -> None:
    text = (DOCKER / dockerfile).read_text()
    base = re.search(r"^FROM (\S+)", text, re.MULTILINE)
    assert base and re.search(r":\d+\.\d+\.\d+", base.group(1)), "base image pinned to a full version"
    users = re.findall(r"^USER (\S+)", text, re.MULTILINE)
    assert users and users[-1] not in ("root", "0")
    assert "HEALTHCHECK" in text
    assert not re.search(r"(TOKEN|API_KEY|SECRET)\w*=\S", text), "no secret baked in"


@pytest.mark.parametrize("example", [".env.example", ".env.tinker.example"])
def test_env_examples_name_every_variable_and_hold_no_secret(example: str) -> None:
    values = dict(line.split("=", 1) for line in (DOCKER / example).read_text().splitlines()
                  if line and not line.startswith("#"))
    for secret in ("TELEGRAM_BOT_TOKEN", "OPENCLAW_GATEWAY_TOKEN", "CLAAS_API_KEYS", "CLAAS_API_KEY"):
        assert values[secret] == ""
    stack = "docker-compose.tinker.yml" if "tinker" in example else "docker-compose.yml"
    used = set(_VAR.findall((DOCKER / stack).read_text()))
    required = {name for name, op, _ in used if op in (":?", "?")}
    assert required <= set(values), f"{example} lacks {required - set(values)}"


def test_init_creates_missing_adapters_and_writes_the_openclaw_config(tmp_path: Path) -> None:
    """docker/init.sh with the real `claas openclaw config`; only the API calls (`claas lora ...`) are a stub that
    reports telegram/assistant as existing."""
    calls = tmp_path / "calls"
    stub = tmp_path / "bin" / "claas"
    stub.parent.mkdir()
    stub.write_text(f"""#!/bin/sh
case "$1" in
  lora) echo "$*" >> {calls}
        if [ "$2" = list ]
        then printf '{{\\n  "loras": [{{\\n    "lora_id": "telegram/assistant"\\n  }}]\\n}}\\n'; fi;;
  *) exec {sys.executable} -m claas "$@";;
esac
""")
    stub.chmod(0o755)
    out = tmp_path / "config" / "openclaw.json"
    env = {"PATH": f"{stub.parent}:{os.environ['PATH']}", "HOME": str(tmp_path), "CLAAS_API_URL": "http://api:8080",
           "CLAAS_LORA_ID": "telegram/assistant", "CLAAS_EXTRA_LORA_IDS": "bob/assistant",
           "OPENCLAW_CONFIG": str(out), "TELEGRAM_ALLOW_FROM": "42", "CLAAS_API_KEY": "k",
           "OPENCLAW_CONFIG_ARGS": "--context-window 8192 --max-tokens 256"}
    result = subprocess.run(["sh", str(DOCKER / "init.sh")], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert calls.read_text().splitlines() == [
        "lora list --url http://api:8080 --prefix telegram/assistant --json",
        "lora list --url http://api:8080 --prefix bob/assistant --json",
        "lora init bob/assistant --url http://api:8080",
    ]
    config = json.loads(out.read_text())
    provider = config["models"]["providers"]["claas"]
    assert provider["baseUrl"] == "http://api:8080/v1" and provider["apiKey"] == "${CLAAS_API_KEY}"
    assert [m["id"] for m in provider["models"]] == ["telegram/assistant", "bob/assistant"]
    assert config["gateway"]["bind"] == "lan"  # reachable through the container's published port
    assert config["channels"]["telegram"]["allowFrom"] == ["42"]
    assert config["plugins"]["load"]["paths"] == ["/opt/claas/claas-feedback"]  # where the images put the plugin
    assert "COPY scripts/openclaw-local/claas-feedback /opt/claas/claas-feedback" in (
        DOCKER / "openclaw" / "Dockerfile").read_text()

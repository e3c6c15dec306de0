"""`openclaw.json` for an OpenClaw gateway that answers through CLaaS (`claas openclaw config`).

The config registers CLaaS's `/v1` as a custom OpenAI-compatible provider whose model ids are the lora_ids, makes
the first one the agent's model, and sets what a headless gateway needs (facts from OpenClaw 2026.9.6's docs):
`gateway.mode: "local"`, a token-authenticated gateway with its OpenAI-compatible `/v1/chat/completions` endpoint
on, no hosted catalog refresh and no update check. For a small model (SmolLM2's 8192-token context) the prompt is
kept short: `tools.profile: "minimal"`, `agents.defaults.skipBootstrap: true` and `compat.supportsTools: false`.
Optionally it loads the `/feedback` plugin (scripts/openclaw-local/claas-feedback) and the Telegram channel.

Secrets are not written into the file unless given literally: by default the gateway token, the Telegram bot token
and CLaaS's API key are `${ENV_VAR}` references, which OpenClaw substitutes at load time.

Not here: installing or running OpenClaw (scripts/openclaw-local), channel startup (`OPENCLAW_SKIP_CHANNELS=1` is
an environment variable of the gateway process, not a config key).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from claas.core.lora_ids import validate_lora_id

PLUGIN_ID = "claas-feedback"
DEFAULT_PROVIDER = "claas"
DEFAULT_GATEWAY_PORT = 18789


def env_ref(name: str) -> str:
    """OpenClaw's env substitution syntax (`${NAME}`, upper-case names only)."""
    return "${" + name + "}"


@dataclass
class OpenClawSetup:
    lora_ids: list[str]
    claas_url: str  # the CLaaS API base URL, with or without /v1
    provider: str = DEFAULT_PROVIDER
    claas_api_key: str | None = None  # literal; else `claas_api_key_env`; else a placeholder (CLaaS auth off)
    claas_api_key_env: str | None = None
    gateway_port: int = DEFAULT_GATEWAY_PORT
    gateway_bind: str = "loopback"  # OpenClaw's bind modes: loopback, lan, tailnet, auto, custom
    gateway_token: str | None = None  # literal; else ${OPENCLAW_GATEWAY_TOKEN}
    context_window: int = 8192
    max_tokens: int = 512
    tools: bool = False  # the model can call tools (a large model); False keeps the prompt small
    plugin_path: str | None = None  # the claas-feedback plugin directory, loaded when given
    feedback_batch_size: int = 1
    telegram: bool = False
    telegram_allow_from: list[str] = field(default_factory=list)  # Telegram user ids; empty = pairing

    def __post_init__(self) -> None:
        if not self.lora_ids:
            raise ValueError("give at least one --lora-id")
        for lora_id in self.lora_ids:
            validate_lora_id(lora_id)
        if not self.claas_url.startswith(("http://", "https://")):
            raise ValueError(f"--claas-url must be an http(s) URL, not {self.claas_url!r}")
        if self.feedback_batch_size < 1:
            raise ValueError("--feedback-batch-size must be >= 1")
        if self.context_window < 256 or self.max_tokens < 1 or self.max_tokens >= self.context_window:
            raise ValueError("--max-tokens must be >= 1 and below --context-window (>= 256)")

    @property
    def v1_url(self) -> str:
        base = self.claas_url.rstrip("/")
        return base if base.endswith("/v1") else f"{base}/v1"

    @property
    def api_root(self) -> str:
        """The API root the plugin posts /v1/feedback to."""
        return self.v1_url.removesuffix("/v1")


def _api_key(setup: OpenClawSetup) -> str:
    if setup.claas_api_key:
        return setup.claas_api_key
    if setup.claas_api_key_env:
        return env_ref(setup.claas_api_key_env)
    return "claas-no-key"  # OpenClaw wants a key; CLaaS without CLAAS_API_KEYS ignores it


def _model_entry(setup: OpenClawSetup, lora_id: str) -> dict[str, Any]:
    return {
        "id": lora_id,
        "name": f"{lora_id} (CLaaS)",
        "reasoning": False,
        "input": ["text"],
        "cost": {"input": 0, "output": 0, "cacheRead": 0, "cacheWrite": 0},
        "contextWindow": setup.context_window,
        "maxTokens": setup.max_tokens,
        "compat": {"supportsTools": setup.tools},
    }


def build_config(setup: OpenClawSetup) -> dict[str, Any]:
    """The openclaw.json document (a plain dict, JSON-serializable)."""
    agent_defaults: dict[str, Any] = {"model": {"primary": f"{setup.provider}/{setup.lora_ids[0]}"}}
    config: dict[str, Any] = {
        "gateway": {
            "mode": "local",
            "port": setup.gateway_port,
            "bind": setup.gateway_bind,
            "auth": {"mode": "token", "token": setup.gateway_token or env_ref("OPENCLAW_GATEWAY_TOKEN")},
            "http": {"endpoints": {"chatCompletions": {"enabled": True}}},
        },
        "models": {
            "mode": "merge",
            "catalogRefresh": {"enabled": False},
            "providers": {
                setup.provider: {
                    "baseUrl": setup.v1_url,
                    "apiKey": _api_key(setup),
                    "api": "openai-completions",
                    "models": [_model_entry(setup, lora_id) for lora_id in setup.lora_ids],
                }
            },
        },
        "agents": {"defaults": agent_defaults},
        "update": {"checkOnStart": False},
    }
    if not setup.tools:
        config["tools"] = {"profile": "minimal"}
        agent_defaults["skipBootstrap"] = True
    if setup.plugin_path:
        plugin_config: dict[str, Any] = {
            "claasUrl": setup.api_root,
            "provider": setup.provider,
            "batchSize": setup.feedback_batch_size,
        }
        if setup.claas_api_key or setup.claas_api_key_env:
            plugin_config["apiKey"] = _api_key(setup)
        config["plugins"] = {
            "allow": [PLUGIN_ID],
            "load": {"paths": [setup.plugin_path]},
            "entries": {
                PLUGIN_ID: {
                    "enabled": True,
                    # llm_input / llm_output carry the turn's text: a non-bundled plugin needs this grant.
                    "hooks": {"allowConversationAccess": True},
                    "config": plugin_config,
                }
            },
        }
    if setup.telegram:
        telegram: dict[str, Any] = {"enabled": True, "botToken": env_ref("TELEGRAM_BOT_TOKEN")}
        if setup.telegram_allow_from:
            telegram |= {"dmPolicy": "allowlist", "allowFrom": list(setup.telegram_allow_from)}
        else:
            telegram["dmPolicy"] = "pairing"
        config["channels"] = {"telegram": telegram}
    return config


def write_config(setup: OpenClawSetup, path: Path) -> Path:
    """Write the config atomically (OpenClaw watches the file and hot-reloads it); 0600 since it may hold keys."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(build_config(setup), indent=2) + "\n")
    os.chmod(tmp, 0o600)
    tmp.replace(path)
    return path

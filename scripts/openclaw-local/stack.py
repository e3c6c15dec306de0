"""Run the whole CLaaS + OpenClaw stack locally without docker, supervised (a crashed process is restarted).

    .venv/bin/python scripts/openclaw-local/stack.py --lora-id telegram/assistant --telegram

Starts, in order and each healthy before the next: the inference server (`claas model-server`, or nothing when
--inference-url points at a running vLLM), the CLaaS API, then an OpenClaw gateway whose config
(`claas openclaw config`) serves every --lora-id and loads the /feedback plugin. Node and OpenClaw come from
install.sh (cached). Adapters that do not exist yet are created once the API is up. Logs: --state-dir/logs/*.log.
Ctrl-C stops everything. See README.md in this folder.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from claas.openclaw import OpenClawSetup, write_config
from claas.supervisor import Service, ServiceBroken, Supervisor

HERE = Path(__file__).resolve().parent
DEFAULT_STATE = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "claas" / "openclaw-local"


def _install() -> tuple[str, str]:
    out = subprocess.run(["bash", str(HERE / "install.sh")], capture_output=True, text=True, check=True).stdout
    paths = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    return paths["NODE"], paths["OPENCLAW"]


def _ensure_adapters(api_url: str, lora_ids: list[str], api_key: str | None) -> None:
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(base_url=api_url, headers=headers, timeout=300) as client:
        for lora_id in lora_ids:
            known = client.get("/v1/lora", params={"prefix": lora_id}).raise_for_status().json()["loras"]
            if not any(lora["lora_id"] == lora_id for lora in known):
                client.post("/v1/lora/init", json={"lora_id": lora_id}).raise_for_status()
                logging.info("created adapter %s", lora_id)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lora-id", action="append", required=True, help="adapter served and trained (repeatable)")
    parser.add_argument("--model", default="smollm2-135m", help="base model of the model server / the API")
    parser.add_argument("--inference-url", help="a running vLLM (e.g. http://127.0.0.1:8000); no model server")
    parser.add_argument("--model-port", type=int, default=8000)
    parser.add_argument("--api-port", type=int, default=8080)
    parser.add_argument("--gateway-port", type=int, default=18789)
    parser.add_argument("--context-window", type=int, default=8192)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--telegram", action="store_true", help="start the Telegram channel (TELEGRAM_BOT_TOKEN)")
    parser.add_argument("--telegram-allow-from", action="append", default=[], help="Telegram user id allowed to DM")
    parser.add_argument("--feedback-batch-size", type=int, default=1)
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` stops the children too, like Ctrl-C
    if args.telegram and not os.environ.get("TELEGRAM_BOT_TOKEN"):
        parser.error("--telegram needs TELEGRAM_BOT_TOKEN in the environment (from @BotFather)")

    node, openclaw = _install()
    state = args.state_dir.resolve()
    api_url = f"http://127.0.0.1:{args.api_port}"
    api_key = os.environ.get("CLAAS_API_KEY")
    token = os.environ.get("OPENCLAW_GATEWAY_TOKEN") or secrets.token_hex(24)
    inference_url = args.inference_url or f"http://127.0.0.1:{args.model_port}"
    base_env = {**os.environ, "CLAAS_VLLM_BASE_URL": inference_url, "CLAAS_BASE_MODEL": args.model,
                "CLAAS_LORA_ROOT": os.environ.get("CLAAS_LORA_ROOT", str(state / "loras")),
                "CLAAS_FEEDBACK_LOG_DIR": os.environ.get("CLAAS_FEEDBACK_LOG_DIR", str(state / "feedback")),
                "CLAAS_CONTEXT_OVERFLOW": os.environ.get("CLAAS_CONTEXT_OVERFLOW", "trim")}

    config_path = state / "openclaw" / "openclaw.json"
    write_config(OpenClawSetup(
        lora_ids=args.lora_id, claas_url=api_url, gateway_port=args.gateway_port, gateway_token=None,
        claas_api_key_env="CLAAS_API_KEY" if api_key else None, context_window=args.context_window,
        max_tokens=args.max_tokens, plugin_path=str(HERE / "claas-feedback"),
        feedback_batch_size=args.feedback_batch_size, telegram=args.telegram,
        telegram_allow_from=args.telegram_allow_from), config_path)
    gateway_env = {**os.environ, "OPENCLAW_STATE_DIR": str(state / "openclaw"),
                   "OPENCLAW_CONFIG_PATH": str(config_path), "OPENCLAW_GATEWAY_TOKEN": token,
                   "OPENCLAW_DISABLE_BONJOUR": "1", "OPENCLAW_NO_RESPAWN": "1", "OPENCLAW_NO_AUTO_UPDATE": "1",
                   "PATH": f"{Path(node).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    if not args.telegram:
        gateway_env["OPENCLAW_SKIP_CHANNELS"] = "1"

    services = []
    if not args.inference_url:
        services.append(Service("model-server", [sys.executable, "-m", "claas", "model-server", "--model",
                                                 args.model, "--port", str(args.model_port)],
                                base_env, health_url=f"{inference_url}/health"))
    services.append(Service("api", [sys.executable, "-m", "claas", "api", "--port", str(args.api_port)], base_env,
                            health_url=f"{api_url}/v1/health",
                            after_start=lambda: _ensure_adapters(api_url, args.lora_id, api_key)))
    services.append(Service("openclaw", [node, openclaw, "gateway"], gateway_env,
                            health_url=None))
    supervisor = Supervisor(services, state / "logs")
    logging.info("OpenClaw gateway on http://127.0.0.1:%d (token in OPENCLAW_GATEWAY_TOKEN%s); logs in %s",
                 args.gateway_port, "" if os.environ.get("OPENCLAW_GATEWAY_TOKEN") else f": {token}",
                 state / "logs")
    try:
        supervisor.run()
    except KeyboardInterrupt:
        logging.info("stopped")
    except ServiceBroken as exc:
        logging.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

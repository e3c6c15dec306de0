"""`python -m claas.modelserver --model NAME --port N ...`: the model server without the CLI (tests use this)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from claas.modelserver.server import serve


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m claas.modelserver", description=__doc__)
    parser.add_argument("--model", default=None, help="registry name, local model dir or HF id (default: settings)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", default=None, help="model id clients use (default: --model)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--cache-dir", type=Path, default=None, help="converted-model cache (default: settings)")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--max-loras", type=int, default=8)
    parser.add_argument(
        "--max-num-seqs", type=int, default=16, help="most sequences (choices) decoding together in one batch"
    )
    parser.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1/*")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="weights dtype, as vLLM's --dtype (auto: bf16 on CUDA, float32 on CPU)",
    )
    parser.add_argument(
        "--generation-config",
        default="auto",
        choices=["auto", "vllm"],
        help="auto: omitted sampling fields take the model's generation defaults; vllm: vLLM's neutral ones",
    )
    parser.add_argument(
        "--override-generation-config",
        type=json.loads,
        default=None,
        help="JSON object of sampling defaults, e.g. '{\"temperature\": 0.5}'",
    )
    args = parser.parse_args(argv)
    model = args.model
    if model is None:
        from claas.core.config import get_settings

        model = get_settings().base_model
    serve(
        model=model,
        host=args.host,
        port=args.port,
        served_model_name=args.served_model_name,
        device=args.device,
        cache_dir=args.cache_dir,
        max_model_len=args.max_model_len,
        max_loras=args.max_loras,
        max_num_seqs=args.max_num_seqs,
        api_key=args.api_key,
        dtype=args.dtype,
        generation_config=args.generation_config,
        override_generation_config=args.override_generation_config,
    )


if __name__ == "__main__":
    main()

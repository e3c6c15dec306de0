"""CLaaS model server: vLLM's HTTP API subset on transformers + PEFT (CPU or GPU).

Modules: `protocol` (request wire models), `sampling` (validated sampling params, sampling and logprob maths),
`textstream` (incremental detokenization, stop strings), `adapters` (PEFT multi-adapter state), `engine` (worker
thread, decode loop, adapters, sleep), `prompts` (chat template, encoding, input checks), `responses` (JSON shapes),
`serving` (chat/completions flows), `app` (`build_app`), `metrics` (vLLM metric names), `server` (`serve`).

Importing this package does not import torch; `serve` and the engine do.
"""

from claas.modelserver.server import serve

__all__ = ["serve"]

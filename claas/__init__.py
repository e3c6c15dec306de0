"""CLaaS: Continual Learning as a Service.

An OpenAI-compatible gateway in front of a vLLM(-compatible) server that turns feedback on served answers into
SDPO training steps on a per-user LoRA adapter.
"""

__version__ = "0.1.0"

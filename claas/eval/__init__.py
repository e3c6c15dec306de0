"""The eval harness: does feedback through CLaaS move the model, and what does it cost?

`claas eval` (or `python -m claas.eval`) reads a Hydra config (`configs/base.yaml` + `configs/preference/*.yaml`),
talks to a running CLaaS gateway over HTTP only, and writes a run folder with per-step metrics, a summary and plots.
"""

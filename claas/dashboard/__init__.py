"""Read-only HTML dashboards served by the API: feedback records (`/v1/dashboard`) and eval runs (`/v1/eval`).

They read only settings and files (the feedback log, the eval folder): no engine, no inference server. Not here:
writing records (claas.feedback) or running evals (the eval harness).
"""

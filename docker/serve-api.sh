#!/bin/sh
# Start the CLaaS API in a container. The compose files publish it on the host at CLAAS_API_BIND (127.0.0.1 by
# default); publishing it beyond this host without API keys is refused here, before anything listens.
set -eu
bind="${CLAAS_API_BIND:-127.0.0.1}"
if [ "$bind" != "127.0.0.1" ] && [ "$bind" != "localhost" ] && [ -z "${CLAAS_API_KEYS:-}" ]; then
  echo "refusing to start: CLAAS_API_BIND=$bind publishes the API beyond this host; set CLAAS_API_KEYS" >&2
  exit 64
fi
exec claas api --host 0.0.0.0 --port 8080 "$@"

#!/bin/sh
# One-shot init of a CLaaS stack: create the first adapter (unless it exists) and write the OpenClaw config.
# Runs in the API image, after the API is healthy; the OpenClaw service starts once this exits 0.
#   CLAAS_API_URL        the API on the compose network (http://api:8080)
#   CLAAS_LORA_ID        the adapter the bot answers with and trains (e.g. telegram/assistant)
#   CLAAS_EXTRA_LORA_IDS space-separated further adapters offered as models (multi-LoRA)
#   OPENCLAW_CONFIG      where to write openclaw.json (a volume the OpenClaw service reads)
#   OPENCLAW_CONFIG_ARGS extra arguments for `claas openclaw config` (e.g. --context-window 32768 --tools)
set -eu
: "${CLAAS_API_URL:?}" "${CLAAS_LORA_ID:?set CLAAS_LORA_ID in .env}" "${OPENCLAW_CONFIG:?}"
ids="$CLAAS_LORA_ID ${CLAAS_EXTRA_LORA_IDS:-}"
lora_args=""
for id in $ids; do
  if claas lora list --url "$CLAAS_API_URL" --prefix "$id" --json | grep -q "\"lora_id\": \"$id\""; then
    echo "adapter $id exists"
  else
    claas lora init "$id" --url "$CLAAS_API_URL"
  fi
  lora_args="$lora_args --lora-id $id"
done
# shellcheck disable=SC2086  # word splitting of the id list and the extra arguments is intended
claas openclaw config $lora_args --claas-url "$CLAAS_API_URL" --gateway-bind lan \
  --plugin /opt/claas/claas-feedback --telegram ${TELEGRAM_ALLOW_FROM:+--telegram-allow-from "$TELEGRAM_ALLOW_FROM"} \
  ${CLAAS_API_KEY:+--api-key-env CLAAS_API_KEY} ${OPENCLAW_CONFIG_ARGS:-} -o "$OPENCLAW_CONFIG"

#!/bin/sh
# The one entry point of every image, and of the local launcher and the end-to-end test, so a
# service starts the same way everywhere: `nanochat-entrypoint <service> [args...]`.
# Settings come from the environment (REGISTRY_*, TRAINER_*, INFERENCE_*, WEBUI_*).
set -eu
PYTHON="${NANOCHAT_PYTHON:-python}"
service="${1:?usage: nanochat-entrypoint registry|trainer-api|trainer-worker|inference|webui|doctor [args]}"
shift
case "$service" in
  registry)       exec "$PYTHON" -m registry "$@" ;;
  trainer-api)    exec "$PYTHON" -m trainer api "$@" ;;
  trainer-worker) exec "$PYTHON" -m trainer worker "$@" ;;
  inference)      exec "$PYTHON" -m inference "$@" ;;
  webui)          exec "$PYTHON" -m webui "$@" ;;
  doctor)         exec "$PYTHON" -m trainer doctor "$@" ;;
  *) echo "nanochat-entrypoint: unknown service '$service'" >&2; exit 2 ;;
esac

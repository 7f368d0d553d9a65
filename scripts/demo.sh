#!/usr/bin/env bash
# Set up (idempotent), then run the demo: embedded broker, a real BGL sample streamed into a raw
# topic, the consumer, and the alerts printed as they arrive.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/logstream demo "$@"

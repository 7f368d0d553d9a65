#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite against the embedded broker and the small real models.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
set +e
# Two worker processes (pytest-xdist), each test file whole on one of them (its module fixtures, e.g. a
# model loaded once, stay in one process); each worker starts its own embedded broker on a free port.
# Most integration tests wait on the broker or a subprocess, so two workers cut the wall time on two
# cores. LOGSTREAM_TEST_WORKERS=0 runs everything in this process (e.g. under a debugger). One torch
# thread per process unless OMP_NUM_THREADS says otherwise: two workers with two threads each on two
# cores oversubscribe them.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
.venv/bin/python -m pytest -n "${LOGSTREAM_TEST_WORKERS:-2}" --dist loadfile "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: treating as a failure" >&2
  exit 1
fi
exit "$rc"

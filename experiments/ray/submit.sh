#!/bin/bash
# Submit a ttrl run to a running Ray cluster as a Ray job (its dashboard, port 8265):
#   RAY_ADDRESS=http://HEAD_IP:8265 experiments/ray/submit.sh experiment=ttrl_math500_qwen2.5-math-1.5b \
#       hydra.run.dir=/shared/ttrl/math500-grpo
# The repo is uploaded as the job's working dir (code and conf/ travel with
# it); the nodes need the same Python environment (e.g. the docker/ image).
# The driver runs on the head and joins the cluster (cluster=ray, address
# "auto" from the job's RAY_ADDRESS). Put hydra.run.dir on storage that
# outlives the job: the working dir copy is deleted after it.
#   ray job logs --follow JOB_ID       ray job stop JOB_ID
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
exec ray job submit --address "${RAY_ADDRESS:-http://127.0.0.1:8265}" --working-dir . \
  --runtime-env-json '{"excludes": [".venv", ".git", "outputs", "multirun", "**/__pycache__"]}' \
  -- python -m ttrl.train cluster=ray "$@"

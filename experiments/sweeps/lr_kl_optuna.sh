#!/bin/bash
# Optuna over trainer.lr and algorithm.kl_coef (conf/hydra/sweeper/optuna_lr_kl.yaml).
# Needs: pip install hydra-optuna-sweeper. Scores eval/pass@1 at the end of each trial:
# evaluate on a split you do not report.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
python -c "import hydra_plugins.hydra_optuna_sweeper" 2>/dev/null \
  || { echo "pip install hydra-optuna-sweeper first" >&2; exit 1; }
ttrl-train -m hydra/sweeper=optuna_lr_kl eval.at_end=true logger.objective=eval/pass@1 "${@:-experiment=demo}"

#!/usr/bin/env bash
# The reproduction study (configs/studies/reproduce_minilm.yaml) and the tables and plots that
# docs/results.md discusses, each made by `adapterbench report` from the study's runs:
#   docs/results/main.md        every full-data method beside the AdapterFusion paper's numbers
#   docs/results/houlsby.md     adapters vs full fine-tuning beside Houlsby et al.'s numbers
#   docs/results/fusion.md      Fusion w/ ST-A and w/ MT-A against the single adapter (paired t-test)
#   docs/results/camtl.md       CA-MTL and MT-A against the multi-task baseline
#   docs/results/fewshot.md     merged adapters (k = 32) against a new adapter at the same k
# The study resumes after any interruption: run this again to go on.
#   ADAPTERBENCH_DATA_DIR=../shared/data/glue bash scripts/reproduce.sh
set -euo pipefail
: "${ADAPTERBENCH_DATA_DIR:?set ADAPTERBENCH_DATA_DIR to a glue_data folder}"
export HF_HUB_OFFLINE=1
adapterbench run configs/studies/reproduce_minilm.yaml || echo "some runs failed: see the study's output; tables follow"
R=runs/reproduce_minilm
D=docs/results
mkdir -p "$D"
adapterbench report "$R" --rows 'head,full,houlsby,pfeiffer,pfeiffer-rf64,fusion,mtl,mt-a,fusion-mta,camtl' \
  --reference adapterfusion-bert-base --out "$D/main.md"
adapterbench report "$R" --rows 'full,houlsby,pfeiffer,pfeiffer-rf64' --reference houlsby-glue --out "$D/houlsby.md"
adapterbench report "$R" --rows 'pfeiffer,fusion,fusion-mta' --versus pfeiffer --out "$D/fusion.md"
adapterbench report "$R" --rows 'mtl,mt-a,camtl' --versus mtl --out "$D/camtl.md"
adapterbench report "$R" --rows 'adapter k=32,merge-*' --versus adapter --out "$D/fewshot.md"

#!/usr/bin/env bash
# Submit the whole DALL-E-mini bias pipeline to SLURM, each step after the ones it needs (afterok):
#
#   generate ─ train(b,m) ─┬─ test(b,m)
#                          └─ tis(b,m) [array] ─ analysis(b,m) ─ bias(b,m)
#   (b: bias type, m: model)
#
#   cd Dalle_explanation
#   ../slurm/submit_dalle_pipeline.sh                              # both bias types, model 1
#   ../slurm/submit_dalle_pipeline.sh --bias_types doctor_gender --models "1 2" --steps train,test
#
# Options:
#   --bias_types "a b"  (default: "doctor_gender doctor_color")
#   --models "1 2"      IEMs (default: 1; bias detection uses each model's TIS statistics)
#   --shards N          TIS job-array size (default: 2 = one task per label)
#   --steps a,b,...     from: generate train test tis analysis bias (default: all)
#   --root DIR          experiment root (default: Dalle_explanation)
#   --after JOBID       make the first jobs wait for this job (afterok)
#   --dry_run           print the sbatch commands, submit nothing
# Environment: PYTHON, SBATCH_ARGS, <STEP>_SBATCH (GEN TRAIN TEST TIS ANALYSIS BIAS) as in
# submit_vqgan_pipeline.sh; script arguments GEN_ARGS TRAIN_ARGS TEST_ARGS TIS_ARGS ANALYSIS_ARGS BIAS_ARGS.
# generate makes both bias types and the neutral set in one job (its --bias_type defaults to all).
set -euo pipefail

EXP=Dalle_explanation
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
TPL=$HERE/dalle
ALL_STEPS=(generate train test tis analysis bias)

BIAS_TYPES="doctor_gender doctor_color" MODELS="1" SHARDS=2 STEPS="" ROOT="" AFTER="" DRY=0
driver_option() {
    case $1 in
        --bias_types) BIAS_TYPES=$2 ;;
        *) return 1 ;;
    esac
}
source "$HERE/pipeline_lib.sh"
pipeline_parse_args "$@"

script_of() {
    case $1 in
        generate) echo generate_dataset.py ;; train) echo train.py ;; test) echo test.py ;;
        tis) echo TIS_computation.py ;; analysis) echo TIS_analysis.py ;; bias) echo bias_detection.py ;;
        *) echo "unknown step $1 (steps: ${ALL_STEPS[*]})" >&2; exit 2 ;;
    esac
}
pipeline_setup

# shellcheck disable=SC2086
step generate generate GEN generate.sbatch "" -- ${GEN_ARGS:-}
for b in $BIAS_TYPES; do
    for m in $MODELS; do
        k=${b}_m$m
        # shellcheck disable=SC2086
        step train "train_$k" TRAIN train.sbatch "generate" --job-name="cortex-dalle-train-$b-m$m" \
            -- --model "$m" --bias_type "$b" ${TRAIN_ARGS:-}
        # shellcheck disable=SC2086
        step test "test_$k" TEST test.sbatch "train_$k" --job-name="cortex-dalle-test-$b-m$m" \
            -- --model "$m" --bias_type "$b" ${TEST_ARGS:-}
        # shellcheck disable=SC2086
        step tis "tis_$k" TIS tis.sbatch "train_$k" --array="0-$((SHARDS - 1))" --job-name="cortex-dalle-tis-$b-m$m" \
            -- --model "$m" --bias_type "$b" ${TIS_ARGS:-}
        # shellcheck disable=SC2086
        step analysis "analysis_$k" ANALYSIS tis_analysis.sbatch "tis_$k" --job-name="cortex-dalle-analysis-$b-m$m" \
            -- --model "$m" --bias_type "$b" ${ANALYSIS_ARGS:-}
        # shellcheck disable=SC2086
        step bias "bias_$k" BIAS bias_detection.sbatch "analysis_$k" --job-name="cortex-dalle-bias-$b-m$m" \
            -- --model "$m" --bias_type "$b" ${BIAS_ARGS:-}
    done
done
pipeline_done

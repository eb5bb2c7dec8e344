#!/usr/bin/env bash
# Submit the whole VQGAN pipeline to SLURM, each step after the ones it needs (--dependency=afterok):
#
#   generate ─┬─ freq ─────────────────────────────────────────────┐
#             ├─ train(m) ─┬─ test(m)                               │
#             │            ├─ tis_train(m) [array] ─ analysis(m) ───┼─ eval_concept(m)
#             │            ├─ tis_test(m)  [array] ─────────────────┼─ eval_image(m)
#             │            └────────────────────────────────────────┼─ eval_codebook(m)
#             └─ evaluators ────────────────────────────────────────┘
#
#   cd VQGAN_explanation
#   ../slurm/submit_vqgan_pipeline.sh                         # model 1, 8 TIS shards, every step
#   ../slurm/submit_vqgan_pipeline.sh --models "1 3" --shards 32 --steps train,test,tis_train,analysis
#   ../slurm/submit_vqgan_pipeline.sh --dry_run               # print the sbatch commands only
#
# Options:
#   --models "1 2"      IEMs (ClassificationNet{m}) to train and explain (default: 1)
#   --shards N          TIS job-array size: label shards per split (default: 8)
#   --steps a,b,...     steps to submit (default: every step whose script exists), from:
#                       generate freq train test tis_train tis_test analysis evaluators eval_image
#                       eval_concept eval_codebook. A step left out is assumed done (no dependency on it).
#   --root DIR          experiment root (datasets/ checkpoints/ results/ logs/; default: VQGAN_explanation)
#   --after JOBID       make the first jobs wait for this job (afterok)
#   --dry_run           print the sbatch commands, submit nothing
# Environment:
#   PYTHON              interpreter for the jobs (default: python of the environment active now)
#   SBATCH_ARGS         extra sbatch options for every job, e.g. "--partition=gpu --account=me"
#   <STEP>_SBATCH       extra sbatch options for one step, e.g. TRAIN_SBATCH="--ntasks-per-node=4 --gres=gpu:4"
#   GEN_ARGS FREQ_ARGS TRAIN_ARGS TEST_ARGS TIS_ARGS TIS_TRAIN_ARGS TIS_TEST_ARGS ANALYSIS_ARGS EVALUATOR_ARGS
#   EVAL_IMAGE_ARGS EVAL_CONCEPT_ARGS EVAL_CODEBOOK_ARGS
#                       extra script arguments per step (word-split), e.g. TRAIN_ARGS="--epochs 40"
# Output: one "<step> <job id>" line per job on stdout, also saved as <root>/logs/slurm_pipeline_<time>.jobs;
# job logs go to <root>/logs/slurm-<job name>-<job id>.out. Jobs of a failed step's dependents are cancelled
# (--kill-on-invalid-dep=yes). Re-running the driver after a failure resumes: training (--resume auto), TIS
# (--resume) and dataset generation skip finished work.
set -euo pipefail

EXP=VQGAN_explanation
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
TPL=$HERE/vqgan
ALL_STEPS=(generate freq train test tis_train tis_test analysis evaluators eval_image eval_concept eval_codebook)

MODELS="1" SHARDS=8 STEPS="" ROOT="" AFTER="" DRY=0
source "$HERE/pipeline_lib.sh"
pipeline_parse_args "$@"

# the script each step runs (a step whose script is missing is left out of the default list)
script_of() {
    case $1 in
        generate) echo generate_dataset.py ;; freq) echo generate_freq_based_tokens.py ;;
        train) echo train.py ;; test) echo test.py ;; tis_train | tis_test) echo TIS_computation.py ;;
        analysis) echo TIS_analysis.py ;; evaluators) echo train_evaluators.py ;;
        eval_image) echo eval/sample_image_level_explanation.py ;;
        eval_concept) echo eval/sample_concept_level_explanation.py ;;
        eval_codebook) echo eval/codebook_level_explanation.py ;;
        *) echo "unknown step $1 (steps: ${ALL_STEPS[*]})" >&2; exit 2 ;;
    esac
}
pipeline_setup

# shellcheck disable=SC2086
step generate generate GEN generate.sbatch "" -- ${GEN_ARGS:-}
step freq freq FREQ freq_tokens.sbatch "generate" -- ${FREQ_ARGS:-}
step evaluators evaluators EVALUATOR train_evaluators.sbatch "generate" -- ${EVALUATOR_ARGS:-}
for m in $MODELS; do
    # shellcheck disable=SC2086
    step train "train_m$m" TRAIN train.sbatch "generate" --job-name="cortex-vqgan-train-m$m" \
        -- --model "$m" ${TRAIN_ARGS:-}
    # shellcheck disable=SC2086
    step test "test_m$m" TEST test.sbatch "train_m$m" --job-name="cortex-vqgan-test-m$m" -- --model "$m" ${TEST_ARGS:-}
    for split in train test; do
        var=TIS_$(tr a-z A-Z <<<"$split")_ARGS
        # shellcheck disable=SC2086
        step "tis_$split" "tis_${split}_m$m" TIS tis.sbatch "train_m$m" --array="0-$((SHARDS - 1))" \
            --job-name="cortex-vqgan-tis-$split-m$m" -- --model "$m" --data_type "$split" ${TIS_ARGS:-} ${!var:-}
    done
    # shellcheck disable=SC2086
    step analysis "analysis_m$m" ANALYSIS tis_analysis.sbatch "tis_train_m$m" \
        --job-name="cortex-vqgan-analysis-m$m" -- --model "$m" ${ANALYSIS_ARGS:-}
    # shellcheck disable=SC2086
    step eval_image "eval_image_m$m" EVAL_IMAGE eval_image_level.sbatch "tis_test_m$m evaluators" \
        --job-name="cortex-vqgan-eval-image-m$m" -- --model "$m" ${EVAL_IMAGE_ARGS:-}
    # shellcheck disable=SC2086
    step eval_concept "eval_concept_m$m" EVAL_CONCEPT eval_concept_level.sbatch "analysis_m$m freq evaluators" \
        --job-name="cortex-vqgan-eval-concept-m$m" -- --model "$m" ${EVAL_CONCEPT_ARGS:-}
    # shellcheck disable=SC2086
    step eval_codebook "eval_codebook_m$m" EVAL_CODEBOOK eval_codebook_level.sbatch "train_m$m evaluators" \
        --job-name="cortex-vqgan-eval-codebook-m$m" -- --model "$m" ${EVAL_CODEBOOK_ARGS:-}
done
pipeline_done

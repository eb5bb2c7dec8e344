# Shared by every slurm/*/*.sbatch template (sourced, not run). Bash only.
#
# A template runs from the experiment folder it was submitted from:
#     cd VQGAN_explanation && sbatch ../slurm/vqgan/train.sbatch --model 1
# Environment it reads (the driver scripts set them; all optional):
#     CORTEX_REPO   the repository (default: the submit folder's parent)
#     CORTEX_ROOT   the experiment root holding datasets/ checkpoints/ results/ logs/ (default: the experiment
#                   folder; ".." from eval/). Relative paths are taken from the submit folder.
#     PYTHON        the interpreter (default: python, i.e. the environment active at sbatch time)
#     OMP_NUM_THREADS  default: --cpus-per-task
set -euo pipefail

cortex_die() { echo "cortex slurm: $*" >&2; exit 2; }

# cortex_enter EXPERIMENT_FOLDER [SUBFOLDER]  -- cd into it, resolve CORTEX_ROOT, print a header
cortex_enter() {
    local exp=$1 sub=${2:-} submit=${SLURM_SUBMIT_DIR:-$PWD}
    if [[ -z ${CORTEX_REPO:-} ]]; then
        if [[ $(basename "$submit") == "$exp" ]]; then
            CORTEX_REPO=$(cd "$submit/.." && pwd)
        elif [[ -d $submit/$exp ]]; then
            CORTEX_REPO=$(cd "$submit" && pwd)
        else
            cortex_die "submit from the $exp folder (cd $exp && sbatch ../slurm/...), or set CORTEX_REPO"
        fi
    fi
    export CORTEX_REPO
    [[ -d $CORTEX_REPO/$exp ]] || cortex_die "CORTEX_REPO=$CORTEX_REPO has no $exp folder"
    if [[ -n ${CORTEX_ROOT:-} ]]; then
        [[ $CORTEX_ROOT == /* ]] || CORTEX_ROOT=$(cd "$submit" && mkdir -p "$CORTEX_ROOT" && cd "$CORTEX_ROOT" && pwd)
    else
        CORTEX_ROOT=$CORTEX_REPO/$exp
    fi
    export CORTEX_ROOT
    PYTHON=${PYTHON:-python}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
    cd "$CORTEX_REPO/$exp${sub:+/$sub}"
    echo "=== ${SLURM_JOB_NAME:-local} job ${SLURM_JOB_ID:-none}${SLURM_ARRAY_TASK_ID:+ array task $SLURM_ARRAY_TASK_ID/${SLURM_ARRAY_TASK_COUNT:-?}}" \
         "on $(hostname -s) at $(date '+%F %T')${SLURM_RESTART_COUNT:+ (restart $SLURM_RESTART_COUNT)}"
    echo "=== cwd $PWD  root $CORTEX_ROOT  python $PYTHON  OMP_NUM_THREADS=$OMP_NUM_THREADS"
}

# cortex_requeue_on_timeout  -- with `#SBATCH --signal=B:USR1@<seconds>`, requeue this job shortly before its
# time limit; the requeued job reruns the same command, which resumes (--resume auto / --resume).
cortex_requeue_on_timeout() {
    trap '_cortex_requeue' USR1
}
_cortex_requeue() {
    local id=${SLURM_JOB_ID:-}
    [[ -n ${SLURM_ARRAY_JOB_ID:-} ]] && id=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}
    echo "=== time limit near: requeueing job $id (it resumes from its last checkpoint)"
    [[ -n $id ]] && scontrol requeue "$id" || true
}

# cortex_run CMD...   -- run CMD (with srun when CORTEX_SRUN=1 inside an allocation), wait for it even while
# trapped signals arrive, and return its exit status.
cortex_run() {
    local cmd=("$@")
    if [[ ${CORTEX_SRUN:-0} == 1 && -n ${SLURM_JOB_ID:-} ]] && command -v srun >/dev/null 2>&1; then
        cmd=(srun --kill-on-bad-exit=1 "${cmd[@]}")
    fi
    echo "+ ${cmd[*]}"
    "${cmd[@]}" &
    local child=$! rc=0
    while true; do
        rc=0
        wait "$child" || rc=$?
        if ((rc > 128)) && kill -0 "$child" 2>/dev/null; then
            continue  # woken by a trapped signal; the command still runs
        fi
        break
    done
    echo "=== exit status $rc at $(date '+%F %T')"
    return "$rc"
}

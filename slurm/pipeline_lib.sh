# Shared by slurm/submit_*_pipeline.sh (sourced). Needs: EXP, REPO, TPL, ALL_STEPS, STEPS, ROOT, AFTER, DRY
# and a function script_of STEP (the script a step runs, relative to the experiment folder).

# pipeline_parse_args "$@": the options every driver takes (--models --shards --steps --root --after --dry_run
# --help) into MODELS SHARDS STEPS ROOT AFTER DRY; a driver's own options go to its function
# driver_option OPT VALUE, which returns 1 for an option it does not know.
pipeline_parse_args() {
    while (($#)); do
        case $1 in
            --models) MODELS=$2; shift 2 ;;
            --shards) SHARDS=$2; shift 2 ;;
            --steps) STEPS=$2; shift 2 ;;
            --root) ROOT=$2; shift 2 ;;
            --after) AFTER=$2; shift 2 ;;
            --dry_run) DRY=1; shift ;;
            -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
            *)
                if declare -F driver_option >/dev/null && driver_option "$1" "${2:-}"; then
                    shift 2
                else
                    echo "unknown option $1 (see --help)" >&2; exit 2
                fi ;;
        esac
    done
    [[ $SHARDS =~ ^[1-9][0-9]*$ ]] || { echo "--shards must be a positive integer" >&2; exit 2; }
}

# pipeline_setup: choose the steps, create <root>/logs, export what the jobs read, cd to the experiment folder
pipeline_setup() {
    declare -gA WANT=() ID=()
    local s f
    if [[ -z $STEPS ]]; then
        for s in "${ALL_STEPS[@]}"; do
            if [[ -f $REPO/$EXP/$(script_of "$s") ]]; then
                WANT[$s]=1
            else
                echo "note: step $s left out: $EXP/$(script_of "$s") does not exist" >&2
            fi
        done
    else
        for s in ${STEPS//,/ }; do
            f=$REPO/$EXP/$(script_of "$s")
            [[ -f $f ]] || { echo "step $s: $f does not exist" >&2; exit 2; }
            WANT[$s]=1
        done
    fi
    ROOT=${ROOT:-$REPO/$EXP}
    mkdir -p "$ROOT/logs"
    ROOT=$(cd "$ROOT" && pwd)
    export CORTEX_REPO=$REPO CORTEX_ROOT=$ROOT PYTHON=${PYTHON:-python}
    JOBS_FILE=$ROOT/logs/slurm_pipeline_$(date +%Y%m%d_%H%M%S).jobs
    if ((!DRY)); then : >"$JOBS_FILE"; fi
    FAKE=1000
    cd "$REPO/$EXP"  # the jobs' working directory (SLURM_SUBMIT_DIR)
}

want() { [[ -n ${WANT[$1]:-} ]]; }

# submit KEY ENV_PREFIX TEMPLATE "DEPENDENCY KEYS" [sbatch options...] -- [script arguments...]
# prints "KEY JOBID"; $ENV_PREFIX_SBATCH adds sbatch options for this kind of job
submit() {
    local key=$1 prefix=$2 template=$3 deps=$4
    shift 4
    local sb=() args=() d ids=() depopt=() id
    while (($#)) && [[ $1 != -- ]]; do sb+=("$1"); shift; done
    if (($#)); then shift; fi
    args=("$@")
    for d in $deps; do
        if [[ -n ${ID[$d]:-} ]]; then ids+=("${ID[$d]}"); fi
    done
    if [[ -n $AFTER ]]; then ids+=("$AFTER"); fi
    if ((${#ids[@]})); then depopt=("--dependency=afterok:$(IFS=:; echo "${ids[*]}")"); fi
    local extra_sb_var=${prefix}_SBATCH
    # shellcheck disable=SC2206
    local cmd=(sbatch --parsable --kill-on-invalid-dep=yes --output="$ROOT/logs/slurm-%x-%j.out"
        ${SBATCH_ARGS:-} ${!extra_sb_var:-} "${sb[@]}" "${depopt[@]}" "$TPL/$template" "${args[@]}")
    if ((DRY)); then
        id=$((FAKE++))
        echo "# ${cmd[*]}" >&2
    else
        id=$("${cmd[@]}")
        id=${id%%;*}
        echo "$key $id" >>"$JOBS_FILE"
    fi
    ID[$key]=$id
    echo "$key $id"
}

# step STEP KEY ENV_PREFIX TEMPLATE "DEPENDENCY KEYS" [sbatch options] -- [script arguments]: submit if wanted
step() {
    local s=$1
    shift
    if want "$s"; then submit "$@"; fi
}

pipeline_done() {
    if ((DRY)); then
        echo "(dry run: nothing submitted)" >&2
    else
        echo "submitted ${#ID[@]} jobs; ids in $JOBS_FILE; logs in $ROOT/logs/slurm-*.out; watch: squeue --me" >&2
    fi
}

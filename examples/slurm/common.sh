# shellcheck shell=bash
# Shared launch logic for the sbatch scripts in this folder. Sourced, not run:
# each *.sbatch sets its knobs, sources this file, calls rw_setup and then
# rw_train (training) or rw_srun (any other step).
#
# Environment it reads (the sbatch files set most defaults):
#   LAUNCHER        container | venv
#   IMAGE           LAUNCHER=container: image for pyxis, a registry image
#                   (nvcr.io#org/repo:tag) or a .sqsh file made by enroot import
#   CONTAINER_MOUNTS  extra pyxis mounts, SRC:DST[,SRC:DST...]
#   CONTAINER_REPO  where the image holds this repository (default /opt/megatron-reweight)
#   VENV            LAUNCHER=venv: virtual environment on the shared filesystem
#                   (default REPO_DIR/.venv); the checkout's code is used
#   RUN_ROOT        shared directory; a run lives in RUN_ROOT/RUN_NAME/{checkpoints,logs,tensorboard}
#   RUN_NAME        name of the run (default: the job name)
#   NPROC_PER_NODE  ranks per node (default: the GPUs Slurm gave the node, else 8)
#   DEVICE          passed as --device when set (the CI sets cpu)
#   MODEL_ARGS_OVERRIDE  replaces the script's model, precision and parallelism
#                   flags (MODEL_ARGS and PARALLEL_ARGS); the CI runs the scripts
#                   with "--preset tiny" this way
#   EXTRA_ARGS      appended to the trainer's flags (for flags with a value, the last wins)
#   MASTER_ADDR, MASTER_PORT  rendezvous endpoint (default: first node, port from the job id)
#   MAX_REQUEUES    stop requeueing after this many restarts (default 20)
#   DRY_RUN=1       print the commands instead of running them; works outside Slurm
#
# Multi-node layout: one srun task per node, each running torchrun, which
# starts that node's ranks. torchrun sets RANK/LOCAL_RANK/WORLD_SIZE the way
# Megatron expects, so the trainer starts exactly as Megatron-LM's
# pretrain_gpt.py does, and there is one process per node for the signal relay
# below to talk to. (One srun task per GPU would need a wrapper mapping
# SLURM_PROCID to RANK, and every rank would be a direct target of Slurm's
# signals.) The nodes meet through torchrun's c10d rendezvous on the first node.
#
# Time limits and preemption. The sbatch files ask for `--signal=B:USR1@LEAD`:
# SIGUSR1 to this batch shell only, LEAD seconds before the time limit.
# Sending SIGTERM to the job steps instead (`--signal=TERM@LEAD`) reaches every
# process of the step, torchrun included, and torchrun forwards it to the ranks
# and SIGKILLs them 30 s later (older torchrun, as in the NGC 25.x images, has
# no setting for it; newer reads TORCH_ELASTIC_SHUTDOWN_TIMEOUT): too short to
# be sure of a 7B save.
# And a signalled srun kills its tasks at once. So:
#   1. this shell traps SIGUSR1 and relays it to the job steps (scancel --signal=USR1);
#   2. on each node, rw_node_task has started torchrun with SIGUSR1 ignored
#      (torchrun and the ranks inherit that); it catches the signal itself and
#      sends SIGTERM to the ranks only, the children of torchrun;
#   3. the ranks (--exit-signal-handler) finish the step, save and exit 0, so
#      torchrun and srun return normally;
#   4. if the checkpoint is short of TRAIN_ITERS, rw_train requeues the job
#      (scontrol requeue, allowed by --requeue) and the next attempt resumes
#      from --load, which the trainer treats as a fresh start while empty.
#      A crash (an error exit without the signal) is not requeued.
# Try it with `scancel --batch --signal=USR1 JOBID`, which is what Slurm sends.

# ----------------------------------------------------------------- helpers
rw_die() {
    echo "error: $*" >&2
    exit 2
}

rw_log() {
    echo "[$(date '+%F %T')] $*"
}

# Print a command line, shell-quoted.
rw_show() {
    printf '%q ' "$@"
    echo
}

# Iteration of the newest complete checkpoint in $1 (0 if none). Megatron
# writes latest_checkpointed_iteration.txt once a save has finished.
rw_checkpoint_iteration() {
    local tracker=$1/latest_checkpointed_iteration.txt it
    if [[ -s $tracker ]]; then
        it=$(tr -d '[:space:]' <"$tracker")
        if [[ $it =~ ^[0-9]+$ ]]; then
            echo "$((10#$it))"
            return
        fi
    fi
    echo 0
}

# Address of the job's first node, for the rendezvous.
# `scontrol show hostnames | head -n1` gives its Slurm node name: a resolvable
# hostname on most clusters, but not everywhere (names can be aliases; the
# CI's emulated nodes are n1 and n2 on 127.0.0.1). NodeAddr is the address
# slurmctld itself uses to reach the node, so it works wherever Slurm does,
# and equals the name when the admins did not set one. If scontrol does not
# report it, fall back to the name.
rw_master_addr() {
    local head addr
    # awk and sed read all their input: `head -n1` could SIGPIPE scontrol (pipefail).
    head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | awk 'NR == 1')
    addr=$(scontrol show node "$head" 2>/dev/null | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p' | awk 'NR == 1') || addr=
    echo "${addr:-$head}"
}

# DATA_PATH=(...) from the data_path.txt files that megatron_reweight.data.prepare
# wrote in $1 and in its subdirectories (one per prepare_fineweb.sbatch task).
# Each file's weights sum to 1 and the parts hold equal token budgets, so
# concatenating the files weights the parts equally, i.e. by size.
rw_data_path() {
    local f words
    DATA_PATH=()
    for f in "$1"/data_path.txt "$1"/*/data_path.txt; do
        [[ -f $f ]] || continue
        read -r -a words <"$f"
        DATA_PATH+=("${words[@]}")
    done
    ((${#DATA_PATH[@]} > 0)) || rw_die "no data_path.txt in $1 or its subdirectories: prepare the data first"
}

# -------------------------------------------------------------------- setup
# rw_setup DIR...: check the job and the launcher; DIRs are the host
# directories the step needs, mounted at the same path in the container.
rw_setup() {
    if [[ ${DRY_RUN:-0} == 1 ]]; then
        # Enough of a job to print the commands on a login node.
        : "${SLURM_JOB_ID:=0}" "${SLURM_JOB_NAME:=dry-run}" "${SLURM_JOB_NODELIST:=node1}"
        : "${SLURM_NNODES:=$(sed -n 's/^#SBATCH --nodes=\([0-9]*\).*/\1/p' "$0" | awk 'NR == 1')}"
        : "${SLURM_NNODES:=1}" "${MASTER_ADDR:=node1}"
    elif [[ -z ${SLURM_JOB_ID:-} ]]; then
        rw_die "not inside a Slurm job: submit with sbatch (or set DRY_RUN=1 to print the commands)"
    fi
    NPROC_PER_NODE=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
    # One task per node. If one fails, stop the others instead of leaving them
    # blocked in a collective. Steps do not inherit the job's --cpus-per-task
    # (Slurm 22.05 to 23.02), so give each task the node's CPUs explicitly; they
    # do get all its GPUs. --export=ALL: the tasks need this shell's environment
    # even if the job was submitted with --export=NONE.
    RW_SRUN=(srun --nodes="$SLURM_NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1
        --cpus-per-task="${SLURM_CPUS_ON_NODE:-1}" --export=ALL)
    case ${LAUNCHER:-} in
    container)
        : "${IMAGE:?set IMAGE to the training image (see docker/README.md), or use LAUNCHER=venv}"
        if [[ ${DRY_RUN:-0} != 1 ]] && ! srun --help 2>/dev/null | grep -q -- --container-image; then
            rw_die "LAUNCHER=container needs the pyxis plugin (srun --container-image); use LAUNCHER=venv"
        fi
        CONTAINER_REPO=${CONTAINER_REPO:-/opt/megatron-reweight}
        local mounts=() dir
        for dir in "$@"; do
            [[ -n $dir && " ${mounts[*]} " != *" $dir:$dir "* ]] && mounts+=("$dir:$dir")
        done
        [[ -n ${CONTAINER_MOUNTS:-} ]] && mounts+=("$CONTAINER_MOUNTS")
        RW_SRUN+=(--container-image="$IMAGE" --container-workdir="$CONTAINER_REPO" --no-container-mount-home)
        ((${#mounts[@]} > 0)) && RW_SRUN+=(--container-mounts="$(IFS=,; echo "${mounts[*]}")")
        TRAINER=${TRAINER:-$CONTAINER_REPO/pretrain_llama.py}
        ;;
    venv)
        VENV=${VENV:-$REPO_DIR/.venv}
        [[ -f $VENV/bin/activate ]] || rw_die "VENV=$VENV is not a virtual environment (see docs/cluster.md)"
        # srun hands this environment to the tasks on every node.
        # shellcheck source=/dev/null
        source "$VENV/bin/activate"
        # Run the checkout's code, installed in the venv or not.
        export PYTHONPATH=$REPO_DIR${PYTHONPATH:+:$PYTHONPATH}
        TRAINER=${TRAINER:-$REPO_DIR/pretrain_llama.py}
        [[ ${DRY_RUN:-0} == 1 || -f $TRAINER ]] || rw_die "trainer $TRAINER not found (set REPO_DIR or TRAINER)"
        ;;
    *) rw_die "LAUNCHER must be container or venv, not '${LAUNCHER:-}'" ;;
    esac

    # What Megatron's own launch scripts set. One hardware queue per GPU keeps
    # the order in which Megatron issues tensor/sequence-parallel communication
    # and the compute it overlaps with.
    export CUDA_DEVICE_MAX_CONNECTIONS=1
    # Abort on a NCCL error or timeout instead of hanging until the time limit.
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    # Network selection (NCCL_IB_HCA, NCCL_SOCKET_IFNAME, NCCL_IB_GID_INDEX, ...)
    # is the cluster's business: NGC images and site modules set it; if yours
    # does not, export it before sbatch.
    export PYTHONUNBUFFERED=1
    # Should a SIGTERM reach torchrun anyway (e.g. from a preempting scheduler),
    # newer torchrun gives the ranks this long to save before SIGKILL.
    export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-240}

    # Catch the time-limit signal from now on (its default action would end
    # the job); rw_train acts on it.
    if [[ ${DRY_RUN:-0} != 1 ]]; then
        trap rw_on_usr1 USR1
    fi
}

# ------------------------------------------------------------------ running
# A step with one task per node: rw_srun CMD...
rw_srun() {
    rw_show "${RW_SRUN[@]}" "$@"
    [[ ${DRY_RUN:-0} == 1 ]] || "${RW_SRUN[@]}" "$@"
}

# What each node's srun task runs: rw_node_task TORCHRUN_COMMAND...
# Sent to the node as source text (declare -f), so it needs nothing from this
# repository inside the container.
rw_node_task() {
    local pid rc
    command -v pkill >/dev/null || { echo "error: pkill (procps) is missing on $HOSTNAME" >&2; return 127; }
    # An ignored signal stays ignored across fork and exec: torchrun and the
    # ranks it starts will not act on the SIGUSR1 meant for this shell.
    trap '' USR1
    "$@" &
    pid=$!
    trap 'echo "${SLURMD_NODENAME:-$HOSTNAME}: SIGUSR1, sending SIGTERM to the ranks"; pkill -TERM -P "$pid"' USR1
    # A trap interrupts wait; wait again until torchrun has exited.
    while :; do
        wait "$pid" && rc=0 || rc=$?
        kill -0 "$pid" 2>/dev/null || return "$rc"
    done
}

RW_SIGNALLED=0
rw_on_usr1() {
    RW_SIGNALLED=1
    rw_log "SIGUSR1: the time limit or a preemption is near; the ranks save and stop"
    scancel --signal=USR1 "$SLURM_JOB_ID" || true
}

# Train on all nodes of the job, resuming from and saving to
# RUN_ROOT/RUN_NAME, and requeue the job when it was cut short. The sbatch
# file sets the run's knobs (variables) and the model flags (arrays):
#   SEQ_LEN GLOBAL_BATCH MICRO_BATCH TRAIN_ITERS LR MIN_LR LR_WARMUP_ITERS
#   REWEIGHT_STRATEGY REWEIGHT_R R_WARMUP_STEPS REWEIGHT_WINDOW SAVE_INTERVAL EVAL_INTERVAL
#   LOG_INTERVAL TOKENIZER TOKENS_PER_GPU_S; DATA_PATH MODEL_ARGS PARALLEL_ARGS; optionally
#   PLAN_NOTE (the layout's plan, printed with the time estimate).
rw_train() {
    : "${RUN_ROOT:?}" "${SEQ_LEN:?}" "${GLOBAL_BATCH:?}" "${MICRO_BATCH:?}" "${TRAIN_ITERS:?}"
    : "${LR:?}" "${MIN_LR:?}" "${LR_WARMUP_ITERS:?}" "${REWEIGHT_STRATEGY:?}" "${REWEIGHT_R:?}"
    : "${R_WARMUP_STEPS:?}" "${REWEIGHT_WINDOW:?}" "${SAVE_INTERVAL:?}" "${EVAL_INTERVAL:?}" "${LOG_INTERVAL:?}"
    : "${TOKENIZER:?}" "${TOKENS_PER_GPU_S:?}"
    local run_dir=$RUN_ROOT/${RUN_NAME:-$SLURM_JOB_NAME}
    local ckpt_dir=$run_dir/checkpoints log_dir=$run_dir/logs tb_dir=$run_dir/tensorboard
    if [[ ${DRY_RUN:-0} != 1 ]]; then
        mkdir -p "$ckpt_dir" "$log_dir" "$tb_dir"
        # A copy of this shell's output next to the checkpoints; the Slurm
        # output file (--output) is relative to the submit directory.
        exec > >(tee -a "$log_dir/$SLURM_JOB_NAME-$SLURM_JOB_ID.log") 2>&1
    fi

    local model=("${MODEL_ARGS[@]}" "${PARALLEL_ARGS[@]}") extra=() device=()
    [[ -n ${MODEL_ARGS_OVERRIDE:-} ]] && read -r -a model <<<"$MODEL_ARGS_OVERRIDE"
    [[ -n ${EXTRA_ARGS:-} ]] && read -r -a extra <<<"$EXTRA_ARGS"
    [[ -n ${DEVICE:-} ]] && device=(--device "$DEVICE")
    local args=("${model[@]}"
        --seq-length "$SEQ_LEN" --max-position-embeddings "$SEQ_LEN"
        --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH" --train-iters "$TRAIN_ITERS"
        --lr "$LR" --min-lr "$MIN_LR" --lr-warmup-iters "$LR_WARMUP_ITERS" --lr-decay-style cosine
        --reweight-strategy "$REWEIGHT_STRATEGY" --reweight-r "$REWEIGHT_R"
        --reweight-r-warmup-steps "$R_WARMUP_STEPS" --reweight-r-warmup-value 100 --reweight-window "$REWEIGHT_WINDOW"
        --data-path "${DATA_PATH[@]}" --tokenizer-model "$TOKENIZER" --data-cache-path "$RUN_ROOT/data-cache"
        --save "$ckpt_dir" --load "$ckpt_dir" --save-interval "$SAVE_INTERVAL" --exit-signal-handler
        --eval-interval "$EVAL_INTERVAL" --log-interval "$LOG_INTERVAL" --tensorboard-dir "$tb_dir"
        "${device[@]}" "${extra[@]}")

    MASTER_ADDR=${MASTER_ADDR:-$(rw_master_addr)}
    # A port per job, so that two jobs sharing a first node do not collide.
    MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID//[^0-9]/} % 20000))}
    local torchrun=("${TORCHRUN:-torchrun}" --nnodes="$SLURM_NNODES" --nproc-per-node="$NPROC_PER_NODE"
        --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$SLURM_JOB_ID"
        --max-restarts=0 "$TRAINER" "${args[@]}")

    awk -v b="$GLOBAL_BATCH" -v s="$SEQ_LEN" -v n="$TRAIN_ITERS" -v tps="$TOKENS_PER_GPU_S" \
        -v g="$((SLURM_NNODES * NPROC_PER_NODE))" 'BEGIN {
        t = b * s * n
        printf "plan: %d sequences x %d tokens x %d steps = %.1fe9 tokens\n", b, s, n, t / 1e9
        printf "plan: %d GPUs at %d tokens/s/GPU: %.1f hours\n", g, tps, t / (tps * g) / 3600
    }'
    [[ -z ${PLAN_NOTE:-} ]] || echo "plan: $PLAN_NOTE"
    local start
    start=$(rw_checkpoint_iteration "$ckpt_dir")
    rw_log "job $SLURM_JOB_ID, attempt $((${SLURM_RESTART_COUNT:-0} + 1))," \
        "$SLURM_NNODES node(s): $SLURM_JOB_NODELIST; rendezvous at $MASTER_ADDR:$MASTER_PORT"
    if ((start > 0)); then
        rw_log "resuming from iteration $start of $TRAIN_ITERS ($ckpt_dir)"
    else
        rw_log "no checkpoint in $ckpt_dir: starting from scratch"
    fi
    if [[ ${DRY_RUN:-0} == 1 ]]; then
        rw_srun "${torchrun[@]}"
        return 0
    fi

    local pid rc=0
    if ((RW_SIGNALLED == 1)); then
        rw_log "the time limit is already near: not starting"
    else
        rw_show "${RW_SRUN[@]}" "${torchrun[@]}"
        # In the background, so that the USR1 trap can run while we wait.
        "${RW_SRUN[@]}" bash -c "$(declare -f rw_node_task); rw_node_task \"\$@\"" rw_node_task "${torchrun[@]}" &
        pid=$!
        while :; do
            wait "$pid" && rc=0 || rc=$?
            kill -0 "$pid" 2>/dev/null || break
        done
    fi

    local now
    now=$(rw_checkpoint_iteration "$ckpt_dir")
    rw_log "training exited with status $rc; checkpoint at iteration $now of $TRAIN_ITERS"
    if ((now >= TRAIN_ITERS)); then
        rw_log "run complete"
        return 0
    fi
    # Unfinished. After our signal, or after a clean exit that made progress
    # (the trainer stopped on purpose, e.g. --exit-duration-in-mins), continue
    # in a new attempt.
    if ((RW_SIGNALLED == 1 || (rc == 0 && now > start))); then
        if ((${SLURM_RESTART_COUNT:-0} >= ${MAX_REQUEUES:-20})); then
            rw_die "not requeueing: the job was already restarted ${MAX_REQUEUES:-20} times (MAX_REQUEUES)"
        fi
        rw_log "requeueing job $SLURM_JOB_ID to continue from iteration $now"
        # Slurm ends this attempt now. It refuses if the job is already on its
        # way back to the queue (preemption with PreemptMode=REQUEUE).
        scontrol requeue "$SLURM_JOB_ID" || rw_log "scontrol requeue failed; resubmit to resume"
        return 0
    fi
    rw_log "error: training failed (status $rc) at iteration $now; not requeueing; resubmit to resume"
    return "$rc"
}

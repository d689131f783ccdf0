#!/bin/bash
# The launch logic behind every sbatch script in slurm/ (they only set resources and call this).
#
#   common.sh train SCRIPT DEFAULT_CONFIG [key=value ...]   one srun step, one task per GPU, preemption-safe
#   common.sh accelerate MODULE [args ...]                   one `accelerate launch` per node (eval, data prep)
#
# Environment (all optional; sbatch passes the submitting shell's environment through):
#   CONFIG         training config (default: the script's preset)        RUN_DIR  -> run.dir=RUN_DIR
#   GPUS_PER_NODE  tasks per node on GPUs (default: from --gpus-per-node); 0 = CPU ranks (gloo), one per
#                  --ntasks-per-node, DS_ACCELERATOR=cpu
#   VENV | CONDA_ENV  environment to activate (default: REPO/.venv if it exists, else python on PATH)
#   REPO           the checkout (default: the directory sbatch was called from)
#   MASTER_PORT    rendezvous port (default: derived from the job id, so a requeued job reuses it)
# NCCL on H100/InfiniBand clusters is configured by exporting its variables before sbatch (they pass
# through), e.g. NCCL_SOCKET_IFNAME=ib0 or =^lo,docker, NCCL_IB_HCA=mlx5, NCCL_DEBUG=WARN, and
# NCCL_ASYNC_ERROR_HANDLING=1 so that a dead rank ends the job instead of hanging it; nothing is hard-wired
# here because the right values are site-specific.
# shellcheck disable=SC1091,SC2016  # sourced environments; per-task variables expand in the task's shell
set -euo pipefail

: "${SLURM_JOB_ID:?submit a slurm/*.sh script with sbatch (README: Running on a Slurm cluster)}"
REPO=${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$REPO"
if [[ -n ${VENV:-} ]]; then
    source "$VENV/bin/activate"
elif [[ -n ${CONDA_ENV:-} ]]; then
    source "$(conda info --base)/etc/profile.d/conda.sh" && conda activate "$CONDA_ENV"
elif [[ -f .venv/bin/activate ]]; then
    source .venv/bin/activate
fi

NNODES=${SLURM_JOB_NUM_NODES:-1}
GPUS=${SLURM_GPUS_PER_NODE:-0}
GPUS_PER_NODE=${GPUS_PER_NODE:-${GPUS##*:}}  # --gpus-per-node=h100:8 gives "h100:8"
if [[ $GPUS_PER_NODE == 0 ]]; then
    export DS_ACCELERATOR=cpu
    TASKS_PER_NODE=${SLURM_NTASKS_PER_NODE:-1}
else
    TASKS_PER_NODE=$GPUS_PER_NODE
fi
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
export MASTER_ADDR MASTER_PORT=${MASTER_PORT:-$((15000 + SLURM_JOB_ID % 15000))}  # below the ephemeral range
export WORLD_SIZE=$((NNODES * TASKS_PER_NODE)) LOCAL_WORLD_SIZE=$TASKS_PER_NODE PYTHONUNBUFFERED=1
echo "[$(date -Is)] job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $NNODES node(s) x $TASKS_PER_NODE" \
     "tasks, master $MASTER_ADDR:$MASTER_PORT"

# --kill-on-bad-exit=0: after a save the ranks exit 75 one by one. Slurm 22.05 steps do not inherit
# --cpus-per-task from the job, so each step names its CPUs.
SRUN=(srun --nodes="$NNODES" --kill-on-bad-exit=0)

train() {  # SCRIPT DEFAULT_CONFIG [overrides]: checkpoint on USR1, exit 75, requeue; exit 0 when done
    local script=$1 config=${CONFIG:-$2}
    shift 2
    local overrides=(${RUN_DIR:+"run.dir=$RUN_DIR"} "$@")
    # Each task is one rank: its rank comes from Slurm, so no torchrun/deepspeed launcher sits between the
    # signal and the trainer.
    "${SRUN[@]}" --ntasks="$WORLD_SIZE" --ntasks-per-node="$TASKS_PER_NODE" \
        ${SLURM_CPUS_PER_TASK:+--cpus-per-task="$SLURM_CPUS_PER_TASK"} \
        bash -c 'RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID exec "$@"' rank \
        python -u "$script" --config "$config" ${overrides[@]+"${overrides[@]}"} &  # bash < 4.4: empty arrays
    local pid=$! requeue=0 rc
    # --signal=B:USR1 (and scancel --batch) signal only this shell; srun forwards USR1 to every task.
    trap 'echo "[$(date -Is)] USR1: asking the trainer to checkpoint"; requeue=1; kill -USR1 $pid || :' USR1
    # Preemption with a GraceTime sends TERM to the tasks themselves: this shell only stays alive (its exit would
    # end the job) until the ranks have saved. A plain scancel or the hard time limit signals srun too, which
    # answers by killing the ranks: no checkpoint then (README: Time limits and preemption).
    trap 'echo "[$(date -Is)] TERM: waiting for the ranks to checkpoint"' TERM
    while :; do  # wait returns early (>128) when a trap fires; keep waiting for the step itself
        rc=0; wait "$pid" || rc=$?
        kill -0 "$pid" 2>/dev/null || break
    done
    rc=0; wait "$pid" || rc=$?  # the step's own code, had a trap ended the last wait just as the step exited
    echo "[$(date -Is)] training step exited $rc"
    if [[ $rc == 75 && $requeue == 1 ]]; then  # checkpoint written on our USR1: continue in a new allocation
        echo "[$(date -Is)] requeueing job $SLURM_JOB_ID"
        trap - TERM  # the requeue ends this shell with TERM
        scontrol requeue "$SLURM_JOB_ID"
    fi
    exit "$rc"  # 0: training done. 75 after TERM: Slurm's own preemption/cancel decides what happens next
}

accelerate() {  # MODULE [args]: one launcher per node starting TASKS_PER_NODE processes (eval, data prep)
    local module=$1 procs=$WORLD_SIZE multi=()
    shift
    if ((procs > 1)); then multi=(--multi_gpu); fi
    # eval.accelerate_cli is `accelerate` with the project's torchvision import fix applied first.
    "${SRUN[@]}" --ntasks="$NNODES" --ntasks-per-node=1 --cpus-per-task="$SLURM_CPUS_ON_NODE" \
        bash -c 'exec python -m eval.accelerate_cli launch --machine_rank "$SLURM_NODEID" "$@"' launcher \
        ${multi[@]+"${multi[@]}"} --num_machines "$NNODES" --num_processes "$procs" --main_process_ip "$MASTER_ADDR" \
        --main_process_port "$MASTER_PORT" --mixed_precision no --dynamo_backend no -m "$module" "$@"
}

case ${1:-} in
    train | accelerate) "$@" ;;
    *) echo "usage: common.sh train SCRIPT CONFIG [key=value ...] | accelerate MODULE [args ...]" >&2; exit 2 ;;
esac

#!/bin/bash
# The whole SPIN loop (`spin-mega run`: for each iteration generate -> pairs -> train -> export -> evaluate)
# on Slurm, resumable: every stage of `spin-mega run` is skipped once done, so running it again, in the
# same job after a requeue or in a later job, continues where it stopped.
#
#   launch/spin_loop.sh CONFIG.yaml --workdir W [--mode allocation|chain] [--links K] \
#       [--gpus-per-node 8] [--partition P] [--account A] [--time 48:00:00] [--venv V] [--set key=value ...]
#
# --mode allocation (default)  one job; `spin-mega run` runs inside it. On the preemption signal the
#                              training ranks checkpoint, the job requeues itself and resumes.
# --mode chain --links K       K jobs, each depending on the previous one (--dependency=afterok): each
#                              runs the same resumable `spin-mega run` until its time limit nears, then
#                              stops cleanly (training checkpointed) and exits 0 so the next job continues.
#                              For clusters whose time limit is shorter than the loop, or that do not
#                              allow requeueing; jobs starting after the loop is complete exit at once.
#                              A job that fails cancels the rest of the chain (--kill-on-invalid-dep).
# Both run on ONE node: `spin-mega run` launches its training stage with torchrun on the node it runs
# on (--nproc = GPUs per node). For training across nodes, run the stages with launch/generate.sbatch,
# launch/train.sbatch and launch/convert.sbatch (see launch/README.md).
#
# Flags and defaults (launch/common.sh has the shared ones; each is also an environment variable):
#   CONFIG            SPIN_CONFIG        required; `spin-mega run` without CONFIG (resume from W/config.yaml) is
#                                        `spin_loop.sh W/config.yaml --workdir W`
#   --mode M          SPIN_LOOP_MODE     allocation | chain (default allocation)
#   --links K         SPIN_LOOP_LINKS    chain mode: number of jobs (default 4)
#   --gpus-per-node G                    default 8: training processes on the node (0: one CPU process)
#   --signal-seconds S                   default 600: warning before the time limit (checkpoint time)
#   --container-image IMG                the batch job itself runs in the image (pyxis' sbatch support)
#   Everything else (--set key=value) goes to `spin-mega run` unchanged.
#
# Preemption inside the job: SIGUSR1/SIGTERM reaching this script are passed as SIGUSR1 to the training
# processes of `spin-mega run` only (found among its descendants), which checkpoint and exit 75; if no
# training is running, the current stage is stopped (stages write their outputs atomically, so an
# interrupted stage simply runs again).
#
#SBATCH --job-name=spin-loop
#SBATCH --nodes=1
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
# shellcheck disable=SC2015,SC2317  # `check || spin_die` exits; trap handlers look unreachable
set -uo pipefail

_spin_dir=$(dirname "${BASH_SOURCE[0]}")
if [ ! -f "$_spin_dir/common.sh" ] && [ -n "${SPIN_LAUNCH_DIR:-}" ]; then _spin_dir=$SPIN_LAUNCH_DIR; fi
if [ ! -f "$_spin_dir/common.sh" ] && [ -n "${SLURM_JOB_ID:-}" ]; then
  # sbatch runs a copy of this script from slurmd's spool: find the original through the job record.
  _spin_cmd=$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null | grep -o ' Command=[^ ]*' | cut -d= -f2-)
  _spin_dir=$(dirname "${_spin_cmd:-.}")
fi
[ -f "$_spin_dir/common.sh" ] || { echo "spin-mega launch: error: cannot find launch/common.sh; set SPIN_LAUNCH_DIR to the launch/ directory" >&2; exit 2; }
SPIN_LAUNCH_DIR=$(cd "$_spin_dir" && pwd -P)
# shellcheck source=common.sh
source "$SPIN_LAUNCH_DIR/common.sh"

# Preemption inside the job (see the header); installed first so that no signal is lost while validating.
_spin_descendants() {
  local -A children=()
  local stat line pid rest ppid
  for stat in /proc/[0-9]*/stat; do
    read -r line <"$stat" 2>/dev/null || continue
    pid=${line%% *}
    rest=${line##*) }
    read -r _ ppid _ <<<"$rest"  # state, ppid, ...
    children[$ppid]+=" $pid"
  done
  local queue=("$1") p c
  while [ ${#queue[@]} -gt 0 ]; do
    p=${queue[0]}
    queue=("${queue[@]:1}")
    for c in ${children[$p]:-}; do
      echo "$c"
      queue+=("$c")
    done
  done
}

_SPIN_RUN_PID=""
_spin_loop_forward() {
  if [ "$_SPIN_REQUEUED" = 1 ]; then
    spin_log "attempt ${SLURM_RESTART_COUNT:-0} of job ${SLURM_JOB_ID:-} ends here (requeued)"
    exit "$SPIN_EX_TEMPFAIL"
  fi
  SPIN_PREEMPTED=1
  [ -n "$_SPIN_RUN_PID" ] || { spin_log "received SIG$1 before spin-mega run started"; return; }
  local pid cmd trainers=()
  for pid in $(_spin_descendants "$_SPIN_RUN_PID"); do
    cmd=$( { tr '\0' ' ' <"/proc/$pid/cmdline"; } 2>/dev/null) || continue  # it may have exited meanwhile
    case " $cmd" in *" -m spin_mega train "*|*"/spin-mega train "*) trainers+=("$pid") ;; esac
  done
  if [ ${#trainers[@]} -gt 0 ]; then
    spin_log "received SIG$1: asking the ${#trainers[@]} training process(es) to checkpoint and stop (SIGUSR1)"
    kill -USR1 "${trainers[@]}" 2>/dev/null || true
  else
    spin_log "received SIG$1 with no training running: stopping the current stage (it runs again on resume)"
    # shellcheck disable=SC2046
    kill -TERM "$_SPIN_RUN_PID" $(_spin_descendants "$_SPIN_RUN_PID") 2>/dev/null || true
  fi
}
trap '_spin_loop_forward USR1' USR1
trap '_spin_loop_forward TERM' TERM

SPIN_ORIG_ARGS=("$@")
spin_parse_args "$@"

RUN_ARGS=()
set -- "${SPIN_ARGS[@]+"${SPIN_ARGS[@]}"}"
while [ $# -gt 0 ]; do
  case "$1" in
    --mode|--links)
      [ $# -ge 2 ] || spin_die "$1 needs a value"
      if [ "$1" = --mode ]; then SPIN_LOOP_MODE=$2; else SPIN_LOOP_LINKS=$2; fi
      shift 2
      ;;
    --mode=*) SPIN_LOOP_MODE=${1#*=}; shift ;;
    --links=*) SPIN_LOOP_LINKS=${1#*=}; shift ;;
    --nproc|--nproc=*) spin_die "--nproc follows from --gpus-per-node here" ;;
    --set) [ $# -ge 2 ] || spin_die "--set needs a value"; RUN_ARGS+=("$1" "$2"); shift 2 ;;
    -*) RUN_ARGS+=("$1"); shift ;;
    *)
      if [ -z "${_spin_config_arg:-}" ]; then _spin_config_arg=$1; else RUN_ARGS+=("$1"); fi
      shift
      ;;
  esac
done
SPIN_LOOP_MODE=${SPIN_LOOP_MODE:-allocation}
SPIN_LOOP_LINKS=${SPIN_LOOP_LINKS:-4}
case "$SPIN_LOOP_MODE" in allocation|chain) ;; *) spin_die "--mode is allocation or chain, not '$SPIN_LOOP_MODE'" ;; esac
_spin_is_uint "$SPIN_LOOP_LINKS" && [ "$SPIN_LOOP_LINKS" -gt 0 ] || spin_die "--links must be a positive whole number, got '$SPIN_LOOP_LINKS'"
SPIN_CONFIG=${_spin_config_arg:-${SPIN_CONFIG:-}}
[ -n "$SPIN_CONFIG" ] || spin_die "no run configuration: pass CONFIG.yaml as the first argument or set SPIN_CONFIG"
[ -f "$SPIN_CONFIG" ] || spin_die "config file $SPIN_CONFIG does not exist"
SPIN_CONFIG=$(cd "$(dirname "$SPIN_CONFIG")" && pwd -P)/$(basename "$SPIN_CONFIG")

spin_check_workdir
spin_setup_python
# One orchestrating process; its training stage starts one process per GPU itself.
if [ "$SPIN_GPUS_PER_NODE" -gt 0 ]; then NPROC=$SPIN_GPUS_PER_NODE; else NPROC=1; fi
SPIN_TASKS_PER_NODE=1
if [ -n "${SPIN_NODES:-}" ] && [ "$SPIN_NODES" != 1 ]; then
  spin_die "spin-mega run trains on one node (torchrun on the node it runs on), not $SPIN_NODES: use --nodes 1, or launch/train.sbatch for training across nodes"
fi
spin_check_layout 1 1
[ "$SPIN_NODES" = 1 ] || spin_die "spin-mega run trains on one node (torchrun on the node it runs on), but the allocation has $SPIN_NODES"
if [ -z "${SPIN_CONTAINER_IMAGE:-}" ]; then
  spin_read_config "$SPIN_CONFIG" "${RUN_ARGS[@]+"${RUN_ARGS[@]}"}"
  SPIN_WORLD_SIZE=$NPROC
  [ $((NPROC % (SPIN_CFG_TP * SPIN_CFG_PP))) -eq 0 ] \
    || spin_die "tensor parallel $SPIN_CFG_TP x pipeline parallel $SPIN_CFG_PP does not divide the $NPROC training processes of the node"
  spin_check_batch "$SPIN_CFG_GBS" "$SPIN_CFG_MBS" "$SPIN_CFG_TP" "$SPIN_CFG_PP"
fi

if ! spin_in_allocation; then
  export SPIN_LOOP_MODE
  if [ -n "${SPIN_CONTAINER_IMAGE:-}" ]; then
    # The orchestrator must see its stages' processes to pass the preemption signal on, so the batch
    # script itself runs in the container (pyxis supports --container-image on sbatch).
    SPIN_SBATCH_ARGS="${SPIN_SBATCH_ARGS:-} --container-image=$SPIN_CONTAINER_IMAGE --container-mounts=$SPIN_WORKDIR:$SPIN_WORKDIR,$SPIN_LAUNCH_DIR:$SPIN_LAUNCH_DIR${SPIN_CONTAINER_MOUNTS:+,$SPIN_CONTAINER_MOUNTS}"
  fi
  if [ "$SPIN_LOOP_MODE" = allocation ]; then
    spin_submit loop "$SPIN_LAUNCH_DIR/spin_loop.sh" "${SPIN_ORIG_ARGS[@]+"${SPIN_ORIG_ARGS[@]}"}"
    exit 0
  fi
  # A link that stops for its time limit ends with 0 for the next one to start; requeueing it as well
  # would run the loop twice at once.
  SPIN_SBATCH_ARGS="${SPIN_SBATCH_ARGS:-} --no-requeue"
  previous=""
  for ((link = 1; link <= SPIN_LOOP_LINKS; link++)); do
    if [ -n "$previous" ]; then SPIN_DEPENDENCY="afterok:$previous"; fi
    id=$(spin_submit loop "$SPIN_LAUNCH_DIR/spin_loop.sh" "${SPIN_ORIG_ARGS[@]+"${SPIN_ORIG_ARGS[@]}"}") || exit $?
    echo "$id"
    previous=${id##* }
    [ "$SPIN_DRY_RUN" = 1 ] && previous="<link $link>"
  done
  exit 0
fi


spin_setup_logs
spin_log "job ${SLURM_JOB_ID} attempt ${SLURM_RESTART_COUNT:-0} ($SPIN_LOOP_MODE mode): spin-mega run with $NPROC training process(es) on $(hostname), work directory $SPIN_WORKDIR"
spin_network_report
RUN_CMD=("${SPIN_MEGA[@]}" run "$SPIN_CONFIG" --workdir "$SPIN_WORKDIR" --nproc "$NPROC" "${RUN_ARGS[@]+"${RUN_ARGS[@]}"}")
if [ "$SPIN_DRY_RUN" = 1 ]; then
  echo "${RUN_CMD[*]}"
  exit 0
fi
# Not under srun: srun would hand the signal to every process of the step, the orchestrator included.
"${RUN_CMD[@]}" >>"$SPIN_LOG_DIR/run.log" 2>&1 &
_SPIN_RUN_PID=$!
spin_log "spin-mega run (pid $_SPIN_RUN_PID) logs to $SPIN_LOG_DIR/run.log"
while kill -0 "$_SPIN_RUN_PID" 2>/dev/null; do wait "$_SPIN_RUN_PID"; done
wait "$_SPIN_RUN_PID"
rc=$?
spin_log "spin-mega run exited with status $rc"
if [ "$rc" -ne 0 ] && [ "$rc" -ne "$SPIN_EX_TEMPFAIL" ]; then tail -n 20 "$SPIN_LOG_DIR/run.log"; fi
if [ "$SPIN_LOOP_MODE" = chain ]; then
  if [ "$SPIN_PREEMPTED" = 1 ] || [ "$rc" -eq "$SPIN_EX_TEMPFAIL" ]; then
    spin_log "stopped for the time limit with the progress saved: the next job of the chain continues"
    exit 0
  fi
  exit "$rc"
fi
# `spin-mega run` under torchrun reports an interrupted training as a failed stage (torchrun folds the
# trainer's 75 into 1): after our own signal every non-zero end means "resume me".
spin_finish "$rc" 1

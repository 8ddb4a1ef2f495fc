#!/bin/bash
# The whole SPIN loop (`spin-mega run`: for each iteration generate -> pairs -> train -> export -> evaluate)
# on Slurm, resumable: every stage of `spin-mega run` is skipped once done, so running it again, in the
# same job after a requeue or in a later job, continues where it stopped.
#
#   launch/spin_loop.sh CONFIG.yaml --workdir W [--mode allocation|chain] [--links K] [--nodes N] \
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
# On one node (--nodes 1, the default) `spin-mega run` starts every stage on the node it runs on: one
# vLLM engine per generation.tensor_parallel_size GPUs in parallel, training under torchrun with one rank
# per GPU. On N > 1 nodes it runs with --launcher slurm: every stage is an srun step across the whole
# allocation (generation sharded over every engine of every node, training over all N x ranks, conversion
# and evaluation once), still resumable and preemptible stage by stage.
#
# Flags and defaults (launch/common.sh has the shared ones; each is also an environment variable):
#   CONFIG            SPIN_CONFIG        required; `spin-mega run` without CONFIG (resume from W/config.yaml) is
#                                        `spin_loop.sh W/config.yaml --workdir W`
#   --mode M          SPIN_LOOP_MODE     allocation | chain (default allocation)
#   --links K         SPIN_LOOP_LINKS    chain mode: number of jobs (default 4)
#   --nodes N                            default 1; N > 1: the stages run as srun steps across N nodes
#   --gpus-per-node G                    default 8 (inside the job: the GPUs the allocation granted)
#   --ranks-per-node R SPIN_RANKS_PER_NODE  training ranks per node, default G (1 without GPUs)
#   --exclusive (default) / --no-exclusive, --mem M: whole nodes with all their memory by default
#   --signal-seconds S                   default 600: warning before the time limit (checkpoint time)
#   --container-image IMG                one node only: `spin-mega run` runs as an srun step in the image
#                                        (the batch script, and so `scontrol requeue`, stay on the host)
#   Everything else (--set key=value) goes to `spin-mega run` unchanged.
#
# Preemption inside the job: SIGUSR1/SIGTERM reaching this script are passed as SIGUSR1 to `spin-mega run`
# alone, which passes them to its running stage (spin_mega/loop/stages.py): to the training ranks (never the
# torchrun agent, which ignores SIGUSR1), which checkpoint and exit 75, or to srun, which relays them to
# every task; any other stage is stopped and runs again on resume. The loop then exits 75 and the job
# requeues itself.
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
_SPIN_RUN_PID=""
_spin_loop_forward() {
  if [ "$_SPIN_REQUEUED" = 1 ]; then
    spin_log "attempt ${SLURM_RESTART_COUNT:-0} of job ${SLURM_JOB_ID:-} ends here (requeued)"
    exit "$SPIN_EX_TEMPFAIL"
  fi
  SPIN_PREEMPTED=1
  [ -n "$_SPIN_RUN_PID" ] || { spin_log "received SIG$1 before spin-mega run started"; return; }
  spin_log "received SIG$1: asking spin-mega run to stop its stage (training ranks checkpoint) and exit (SIGUSR1)"
  kill -USR1 "$_SPIN_RUN_PID" 2>/dev/null || true
}
trap '_spin_loop_forward USR1' USR1
trap '_spin_loop_forward TERM' TERM

SPIN_ORIG_ARGS=("$@")
spin_parse_args "$@"

RUN_ARGS=()
set -- "${SPIN_ARGS[@]+"${SPIN_ARGS[@]}"}"
while [ $# -gt 0 ]; do
  case "$1" in
    --mode|--links|--ranks-per-node)
      [ $# -ge 2 ] || spin_die "$1 needs a value"
      case "$1" in --mode) SPIN_LOOP_MODE=$2 ;; --links) SPIN_LOOP_LINKS=$2 ;; *) SPIN_RANKS_PER_NODE=$2 ;; esac
      shift 2
      ;;
    --mode=*) SPIN_LOOP_MODE=${1#*=}; shift ;;
    --links=*) SPIN_LOOP_LINKS=${1#*=}; shift ;;
    --ranks-per-node=*) SPIN_RANKS_PER_NODE=${1#*=}; shift ;;
    --nproc|--nproc=*|--launcher|--launcher=*) spin_die "$1 follows from --ranks-per-node and --nodes here" ;;
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
if [ -z "${SPIN_RANKS_PER_NODE:-}" ]; then
  if [ "$SPIN_GPUS_PER_NODE" -gt 0 ]; then SPIN_RANKS_PER_NODE=$SPIN_GPUS_PER_NODE; else SPIN_RANKS_PER_NODE=1; fi
fi
_spin_is_uint "$SPIN_RANKS_PER_NODE" && [ "$SPIN_RANKS_PER_NODE" -gt 0 ] \
  || spin_die "--ranks-per-node must be a positive whole number, got '$SPIN_RANKS_PER_NODE'"
spin_check_layout 1 1
if [ "$SPIN_NODES" -gt 1 ]; then
  # The loop runs on the batch host and starts its stages as srun steps: one task per training rank.
  LAUNCHER=slurm
  SPIN_TASKS_PER_NODE=$SPIN_RANKS_PER_NODE
  [ -z "${SPIN_CONTAINER_IMAGE:-}" ] \
    || spin_die "--container-image runs the loop on one node (its srun steps cannot be started from inside the image): use --nodes 1, or the stage scripts for several nodes"
else
  # One orchestrating process; its training stage starts the ranks itself (torchrun).
  LAUNCHER=local
  SPIN_TASKS_PER_NODE=1
fi
SPIN_WORLD_SIZE=$((SPIN_NODES * SPIN_RANKS_PER_NODE))
spin_container_paths_in "$SPIN_CONFIG" "${RUN_ARGS[@]+"${RUN_ARGS[@]}"}"
if [ -z "${SPIN_CONTAINER_IMAGE:-}" ]; then
  spin_read_config "$SPIN_CONFIG" "${RUN_ARGS[@]+"${RUN_ARGS[@]}"}"
  [ $((SPIN_WORLD_SIZE % (SPIN_CFG_TP * SPIN_CFG_PP))) -eq 0 ] \
    || spin_die "tensor parallel $SPIN_CFG_TP x pipeline parallel $SPIN_CFG_PP does not divide the $SPIN_WORLD_SIZE training ranks ($SPIN_NODES nodes x $SPIN_RANKS_PER_NODE)"
  spin_check_batch "$SPIN_CFG_GBS" "$SPIN_CFG_MBS" "$SPIN_CFG_TP" "$SPIN_CFG_PP"
fi

if ! spin_in_allocation; then
  export SPIN_LOOP_MODE SPIN_RANKS_PER_NODE
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


spin_check_container_support
spin_setup_logs
spin_log "job ${SLURM_JOB_ID} attempt ${SLURM_RESTART_COUNT:-0} ($SPIN_LOOP_MODE mode): spin-mega run on $SPIN_NODES node(s) x $SPIN_RANKS_PER_NODE training rank(s) ($LAUNCHER stages) from $(hostname), work directory $SPIN_WORKDIR"
spin_network_report
RUN_CMD=("${SPIN_MEGA[@]}" run "$SPIN_CONFIG" --workdir "$SPIN_WORKDIR" --nproc "$SPIN_RANKS_PER_NODE" --launcher "$LAUNCHER"
  "${RUN_ARGS[@]+"${RUN_ARGS[@]}"}")
if [ -n "${SPIN_CONTAINER_IMAGE:-}" ]; then
  # In the image, as one srun step with every CPU of the node; this script (and `scontrol requeue`)
  # stays on the host. Slurm signals every process of a step: the loop's stages tolerate that.
  SPIN_STEP_NAME=run
  SPIN_STEP_NODES=1
  SPIN_STEP_TASKS_PER_NODE=1
  spin_srun_cmd
  RUN_CMD=("${SPIN_SRUN[@]}" "${RUN_CMD[@]}")
fi
if [ "$SPIN_DRY_RUN" = 1 ]; then
  echo "${RUN_CMD[*]}"
  exit 0
fi
# Not under srun without a container: the loop alone gets the signal and passes it to its stage.
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
# After our own signal every non-zero end means "resume me" (a signal that lands between two stages ends
# the loop before it can answer 75).
spin_finish "$rc" 1

# shellcheck shell=bash
# `check || spin_die ...` is meant (spin_die exits); variables set here are read by the sourcing scripts.
# shellcheck disable=SC2015,SC2034
# Shared glue for the spin-mega Slurm scripts (train.sbatch, generate.sbatch, convert.sbatch, spin_loop.sh).
# Sourced, never executed. Nothing here starts work: it parses the launch flags, validates them against
# the allocation, derives the rendezvous address, builds the srun command and runs one step with
# preemption handling.
#
# Launch flags (every one also an environment variable; a flag beats the variable):
#   --workdir DIR          SPIN_WORKDIR          required; must already exist (see spin_check_workdir)
#   --nodes N              SPIN_NODES            default 1 at submission; inside a job, the allocation's
#                                                node count, and a different explicit value is an error
#   --gpus-per-node G      SPIN_GPUS_PER_NODE    default 8; 0 runs on CPUs (gloo), as the tests do
#   --tasks-per-node T     SPIN_TASKS_PER_NODE   default: G (one task per GPU), or 1 when G is 0
#   --cpus-per-task C      SPIN_CPUS_PER_TASK    default: the node's CPUs the allocation granted
#                                                (SLURM_CPUS_ON_NODE) divided by the step's tasks per node
#   --exclusive / --no-exclusive  SPIN_EXCLUSIVE default 1: whole nodes (sbatch --exclusive), so that the
#                                                ranks get every CPU and the memory of their nodes
#   --mem M                SPIN_MEM              default 0 (all of the node's memory) with --exclusive
#   --partition P          SPIN_PARTITION        default: the cluster's default partition
#   --account A            SPIN_ACCOUNT          default: the user's default account
#   --qos Q                SPIN_QOS              default: none
#   --time T               SPIN_TIME             default: the partition's limit (e.g. 24:00:00)
#   --job-name NAME        SPIN_JOB_NAME         default: spin-<stage>
#   --dependency DEP       SPIN_DEPENDENCY       e.g. afterok:1234 (spin_loop.sh chains jobs with it)
#   --signal-seconds S     SPIN_SIGNAL_SECONDS   default 600: sbatch --signal=B:USR1@S, the warning before
#                                                the time limit; it must cover finishing the current
#                                                optimizer step plus writing a checkpoint (see README)
#   --container-image IMG  SPIN_CONTAINER_IMAGE  pyxis/enroot image for every srun step; unset: no container
#   --container-mounts M   SPIN_CONTAINER_MOUNTS extra src:dst[,src:dst] mounts; the directory of every
#                                                path argument (config, model, data, --set k=/path, the
#                                                config's own absolute paths, venv, work directory,
#                                                launch/) is always mounted at the same path
#   --container-name NAME  SPIN_CONTAINER_NAME   default spin-<job id>: one container per job, reused by
#                                                all of its steps and attempts (pyxis --container-name)
#   --venv DIR             SPIN_VENV             virtualenv whose bin/python runs spin-mega
#   --python PY            SPIN_PYTHON           interpreter (default: $SPIN_VENV/bin/python, else python3)
#   --max-restarts N       SPIN_MAX_RESTARTS     default 100: stop requeueing after this many restarts
#   --task-exit-wait S     SPIN_TASK_EXIT_WAIT   default 300: srun --wait, how long the other ranks may
#                                                outlive the first rank to exit before Slurm kills them
#   --sbatch-args "..."    SPIN_SBATCH_ARGS      extra sbatch arguments, word-split (e.g. "--exclusive")
#   --submit                                     submit with sbatch even from inside an allocation
#   --dry-run                                    validate and print the sbatch/srun command, start nothing
# Anything else is kept, in order, in the array SPIN_ARGS for the calling script.
#
# Network: NCCL_SOCKET_IFNAME, NCCL_IB_HCA, NCCL_IB_GID_INDEX, NCCL_NET_GDR_LEVEL, NCCL_DEBUG,
# GLOO_SOCKET_IFNAME, ... are never set here: set them in the submitting shell (sbatch exports the
# environment) and they reach every rank unchanged; the job log lists the ones in effect. MASTER_ADDR and
# MASTER_PORT likewise win when the user sets them.

# spin_mega/rundir.py's EXIT_BAD_INPUT and EXIT_PREEMPTED (tests/launch/test_validation.py holds them equal).
SPIN_EX_USAGE=2       # bad flags, bad layout, missing directory: nothing was started
SPIN_EX_TEMPFAIL=75   # the trainer checkpointed after SIGUSR1/SIGTERM: requeue and resume

spin_die() {
  echo "spin-mega launch: error: $*" >&2
  exit "$SPIN_EX_USAGE"
}

spin_log() {
  echo "[spin-mega launch $(date '+%F %T')] $*" >&2
}

_spin_is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }

# Parses the launch flags listed at the top; the rest goes to SPIN_ARGS.
spin_parse_args() {
  SPIN_ARGS=()
  SPIN_DRY_RUN=${SPIN_DRY_RUN:-0}
  SPIN_FORCE_SUBMIT=${SPIN_FORCE_SUBMIT:-0}
  local flag value
  while [ $# -gt 0 ]; do
    flag=$1
    value=""
    case "$flag" in
      --*=*) value=${flag#*=}; flag=${flag%%=*}; set -- "$flag" "$value" "${@:2}" ;;
    esac
    case "$flag" in
      --workdir|--nodes|--gpus-per-node|--tasks-per-node|--cpus-per-task|--partition|--account|--qos|\
      --time|--job-name|--dependency|--signal-seconds|--container-image|--container-mounts|--venv|\
      --python|--max-restarts|--task-exit-wait|--sbatch-args|--mem|--container-name)
        [ $# -ge 2 ] || spin_die "$flag needs a value"
        value=$2
        case "$flag" in
          --workdir) SPIN_WORKDIR=$value ;;
          --nodes) SPIN_NODES=$value ;;
          --gpus-per-node) SPIN_GPUS_PER_NODE=$value ;;
          --tasks-per-node) SPIN_TASKS_PER_NODE=$value ;;
          --cpus-per-task) SPIN_CPUS_PER_TASK=$value ;;
          --partition) SPIN_PARTITION=$value ;;
          --account) SPIN_ACCOUNT=$value ;;
          --qos) SPIN_QOS=$value ;;
          --time) SPIN_TIME=$value ;;
          --job-name) SPIN_JOB_NAME=$value ;;
          --dependency) SPIN_DEPENDENCY=$value ;;
          --signal-seconds) SPIN_SIGNAL_SECONDS=$value ;;
          --container-image) SPIN_CONTAINER_IMAGE=$value ;;
          --container-mounts) SPIN_CONTAINER_MOUNTS=$value ;;
          --venv) SPIN_VENV=$value ;;
          --python) SPIN_PYTHON=$value ;;
          --max-restarts) SPIN_MAX_RESTARTS=$value ;;
          --task-exit-wait) SPIN_TASK_EXIT_WAIT=$value ;;
          --sbatch-args) SPIN_SBATCH_ARGS=$value ;;
          --mem) SPIN_MEM=$value ;;
          --container-name) SPIN_CONTAINER_NAME=$value ;;
        esac
        shift 2
        ;;
      --dry-run) SPIN_DRY_RUN=1; shift ;;
      --exclusive) SPIN_EXCLUSIVE=1; shift ;;
      --no-exclusive) SPIN_EXCLUSIVE=0; shift ;;
      --submit) SPIN_FORCE_SUBMIT=1; shift ;;
      --) SPIN_ARGS+=("${@:2}"); break ;;
      *) SPIN_ARGS+=("$1"); shift ;;
    esac
  done
  # Inside an allocation made with plain `sbatch -N .. --ntasks-per-node .. --gpus-per-node ..`, the
  # request itself is the default.
  if spin_in_allocation; then
    # What the allocation granted beats what was asked for (--gres, --gpus, cluster defaults).
    if [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then
      if [ -n "${SPIN_GPUS_PER_NODE:-}" ] && [ "$SPIN_GPUS_PER_NODE" != "$SLURM_GPUS_ON_NODE" ] && [ "$SPIN_GPUS_PER_NODE" != 0 ]; then
        spin_die "asked for $SPIN_GPUS_PER_NODE GPUs per node (SPIN_GPUS_PER_NODE/--gpus-per-node) but the allocation granted $SLURM_GPUS_ON_NODE"
      fi
      [ "${SPIN_GPUS_PER_NODE:-}" = 0 ] || SPIN_GPUS_PER_NODE=$SLURM_GPUS_ON_NODE
    fi
    if [ -z "${SPIN_GPUS_PER_NODE:-}" ] && [ -n "${SLURM_GPUS_PER_NODE:-}" ]; then SPIN_GPUS_PER_NODE=${SLURM_GPUS_PER_NODE##*:}; fi
    if [ -z "${SPIN_TASKS_PER_NODE:-}" ] && [ -n "${SLURM_NTASKS_PER_NODE:-}" ]; then SPIN_TASKS_PER_NODE=${SLURM_NTASKS_PER_NODE%%(*}; fi
  fi
  SPIN_GPUS_PER_NODE=${SPIN_GPUS_PER_NODE:-8}
  SPIN_SIGNAL_SECONDS=${SPIN_SIGNAL_SECONDS:-600}
  SPIN_MAX_RESTARTS=${SPIN_MAX_RESTARTS:-100}
  SPIN_TASK_EXIT_WAIT=${SPIN_TASK_EXIT_WAIT:-300}
  SPIN_EXCLUSIVE=${SPIN_EXCLUSIVE:-1}
  [ "$SPIN_EXCLUSIVE" = 1 ] && SPIN_MEM=${SPIN_MEM:-0}
  local name
  for name in SPIN_GPUS_PER_NODE SPIN_SIGNAL_SECONDS SPIN_MAX_RESTARTS SPIN_TASK_EXIT_WAIT; do
    _spin_is_uint "${!name}" || spin_die "$name must be a whole number, got '${!name}'"
  done
  if [ -n "${SPIN_TASKS_PER_NODE:-}" ]; then SPIN_TASKS_PER_NODE_GIVEN=1; else SPIN_TASKS_PER_NODE_GIVEN=0; fi
  if [ -z "${SPIN_TASKS_PER_NODE:-}" ]; then
    if [ "$SPIN_GPUS_PER_NODE" -gt 0 ]; then SPIN_TASKS_PER_NODE=$SPIN_GPUS_PER_NODE; else SPIN_TASKS_PER_NODE=1; fi
  fi
  _spin_is_uint "$SPIN_TASKS_PER_NODE" && [ "$SPIN_TASKS_PER_NODE" -gt 0 ] \
    || spin_die "SPIN_TASKS_PER_NODE (--tasks-per-node) must be a positive whole number, got '$SPIN_TASKS_PER_NODE'"
  if [ -n "${SPIN_CPUS_PER_TASK:-}" ]; then
    _spin_is_uint "$SPIN_CPUS_PER_TASK" && [ "$SPIN_CPUS_PER_TASK" -gt 0 ] \
      || spin_die "SPIN_CPUS_PER_TASK (--cpus-per-task) must be a positive whole number, got '$SPIN_CPUS_PER_TASK'"
  fi
}

# True inside a Slurm allocation that this script should use (sbatch job, salloc shell), false when the
# script should submit itself.
spin_in_allocation() {
  [ -n "${SLURM_JOB_ID:-}" ] && [ "${SPIN_FORCE_SUBMIT:-0}" != 1 ]
}

# A missing work directory is an error rather than something to create: on a cluster it almost always
# means a typo or a shared filesystem that is not mounted where the job runs, and creating it would
# scatter checkpoints over node-local disks.
spin_check_workdir() {
  [ -n "${SPIN_WORKDIR:-}" ] || spin_die "no work directory: pass --workdir DIR or set SPIN_WORKDIR"
  [ -d "$SPIN_WORKDIR" ] || spin_die "work directory $SPIN_WORKDIR does not exist (create it on the shared filesystem first)"
  [ -w "$SPIN_WORKDIR" ] || spin_die "work directory $SPIN_WORKDIR is not writable"
  SPIN_WORKDIR=$(cd "$SPIN_WORKDIR" && pwd -P)
}

# spin_check_layout TP PP: the node count matches the allocation and TP x PP divides the world size.
spin_check_layout() {
  local tp=${1:-1} pp=${2:-1}
  _spin_is_uint "$tp" && [ "$tp" -gt 0 ] || spin_die "tensor-parallel size must be a positive whole number, got '$tp'"
  _spin_is_uint "$pp" && [ "$pp" -gt 0 ] || spin_die "pipeline-parallel size must be a positive whole number, got '$pp'"
  if spin_in_allocation; then
    local allocated=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-}}
    [ -n "$allocated" ] || spin_die "inside job $SLURM_JOB_ID but SLURM_JOB_NUM_NODES is unset"
    if [ -n "${SPIN_NODES:-}" ] && [ "$SPIN_NODES" != "$allocated" ]; then
      spin_die "asked for $SPIN_NODES nodes (SPIN_NODES/--nodes) but the allocation has $allocated ($SLURM_JOB_NODELIST)"
    fi
    SPIN_NODES=$allocated
  fi
  SPIN_NODES=${SPIN_NODES:-1}
  _spin_is_uint "$SPIN_NODES" && [ "$SPIN_NODES" -gt 0 ] || spin_die "node count must be a positive whole number, got '$SPIN_NODES'"
  SPIN_WORLD_SIZE=$((SPIN_NODES * SPIN_TASKS_PER_NODE))
  if [ $((SPIN_WORLD_SIZE % (tp * pp))) -ne 0 ]; then
    spin_die "tensor parallel $tp x pipeline parallel $pp = $((tp * pp)) does not divide the world size $SPIN_WORLD_SIZE ($SPIN_NODES nodes x $SPIN_TASKS_PER_NODE tasks per node)"
  fi
  if [ "$SPIN_GPUS_PER_NODE" -gt 0 ] && [ "$tp" -gt "$SPIN_GPUS_PER_NODE" ]; then
    spin_log "warning: tensor parallel $tp spans nodes ($SPIN_GPUS_PER_NODE GPUs per node): its all-reduces will run over the network"
  fi
}

# Resolves the interpreter into SPIN_MEGA (an array: the command that runs spin-mega).
spin_setup_python() {
  if [ -n "${SPIN_VENV:-}" ] && [ -z "${SPIN_PYTHON:-}" ]; then
    SPIN_PYTHON=$SPIN_VENV/bin/python
  fi
  SPIN_PYTHON=${SPIN_PYTHON:-python3}
  SPIN_MEGA=("$SPIN_PYTHON" -m spin_mega)
  # Inside a container the interpreter is the image's; it cannot be checked from the batch host.
  [ -n "${SPIN_CONTAINER_IMAGE:-}" ] && return 0
  if [ -n "${SPIN_VENV:-}" ] && [ ! -x "$SPIN_VENV/bin/python" ]; then
    spin_die "SPIN_VENV=$SPIN_VENV has no bin/python"
  fi
  command -v "$SPIN_PYTHON" >/dev/null || spin_die "python interpreter '$SPIN_PYTHON' not found (set SPIN_PYTHON or SPIN_VENV)"
  "$SPIN_PYTHON" -c "import spin_mega" 2>/dev/null \
    || spin_die "'$SPIN_PYTHON' cannot import spin_mega (set SPIN_VENV/SPIN_PYTHON to the environment it is installed in)"
}

# Rendezvous for torch.distributed: rank 0 lives on the allocation's first node; the port follows the job
# id (jobs sharing a node do not collide) and the restart count (a requeued attempt never waits for the
# previous attempt's socket to leave TIME_WAIT). Derived in one place, spin_mega/parallel/rendezvous.py,
# asked through `python -m spin_mega.loop.slurm rendezvous`. With a container image the interpreter is the
# image's and cannot run here: the ranks then derive the same address and port themselves.
spin_master_env() {
  if [ -z "${SPIN_CONTAINER_IMAGE:-}" ] && { [ -z "${MASTER_ADDR:-}" ] || [ -z "${MASTER_PORT:-}" ]; }; then
    local rendezvous
    rendezvous=$("$SPIN_PYTHON" -m spin_mega.loop.slurm rendezvous) || exit "$SPIN_EX_USAGE"
    MASTER_ADDR=${MASTER_ADDR:-${rendezvous% *}}
    MASTER_PORT=${MASTER_PORT:-${rendezvous#* }}
  fi
  [ -n "${MASTER_ADDR:-}" ] && export MASTER_ADDR
  [ -n "${MASTER_PORT:-}" ] && export MASTER_PORT
  # Stale torchrun variables from the submitting shell would override the Slurm task ids in the trainer.
  unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE GROUP_RANK
}

spin_network_report() {
  local set_vars
  set_vars=$(env | grep -E '^(NCCL_|GLOO_|UCX_|FI_|TORCH_NCCL_)' | sort | tr '\n' ' ')
  local rendezvous=""
  [ -n "${MASTER_ADDR:-}" ] && rendezvous="rendezvous $MASTER_ADDR:${MASTER_PORT:-<per stage>}; "
  spin_log "${rendezvous}network variables in effect: ${set_vars:-none (library defaults)}"
}

# Log directory of this job and attempt: WORKDIR/logs/<job name>-<job id>/attempt-<restart>/.
spin_setup_logs() {
  local name=${SLURM_JOB_NAME:-spin}
  SPIN_LOG_DIR=$SPIN_WORKDIR/logs/$name-${SLURM_JOB_ID:-local}/attempt-${SLURM_RESTART_COUNT:-0}
  mkdir -p "$SPIN_LOG_DIR" || spin_die "cannot create the log directory $SPIN_LOG_DIR"
}

# The srun prefix for one step over the whole allocation (or SPIN_STEP_NODES / SPIN_STEP_TASKS_PER_NODE),
# with one log file per rank.
spin_srun_cmd() {
  local nodes=${SPIN_STEP_NODES:-$SPIN_NODES} tpn=${SPIN_STEP_TASKS_PER_NODE:-$SPIN_TASKS_PER_NODE}
  SPIN_SRUN=(srun --nodes="$nodes" --ntasks="$((nodes * tpn))" --ntasks-per-node="$tpn"
    --kill-on-bad-exit=0 --wait="$SPIN_TASK_EXIT_WAIT"
    --output="$SPIN_LOG_DIR/${SPIN_STEP_NAME:-step}-rank-%t.log" --open-mode=append)
  local cpus=${SPIN_CPUS_PER_TASK:-}
  # srun does not pass the job's CPUs on by itself: without this every task of the step gets one CPU.
  if [ -z "$cpus" ] && _spin_is_uint "${SLURM_CPUS_ON_NODE:-x}"; then
    cpus=$((SLURM_CPUS_ON_NODE / tpn))
    [ "$cpus" -gt 0 ] || cpus=1
  fi
  [ -n "$cpus" ] && SPIN_SRUN+=(--cpus-per-task="$cpus")
  spin_container_args
  SPIN_SRUN+=("${SPIN_CONTAINER_ARGS[@]+"${SPIN_CONTAINER_ARGS[@]}"}")
  return 0
}

# spin_container_path PATH...: the directories to mount so that PATH exists inside the container at the
# same place (a file's directory; for a path not created yet, its parent). A path with neither on this host
# cannot be mounted: refused before anything is queued.
SPIN_CONTAINER_DIRS=()
spin_container_path() {
  [ -n "${SPIN_CONTAINER_IMAGE:-}" ] || return 0
  local path dir
  for path in "$@"; do
    [ -n "$path" ] || continue
    case "$path" in /*) ;; *) path=$(pwd -P)/$path ;; esac
    if [ -d "$path" ]; then dir=$path; else dir=$(dirname "$path"); fi
    [ -d "$dir" ] || spin_die "$path is outside every container mount: neither it nor its directory exists on this host"
    SPIN_CONTAINER_DIRS+=("$(cd "$dir" && pwd -P)")
  done
}

# The absolute paths among a command's arguments (PATH, --flag PATH, --flag=PATH, --set key=PATH) and, for
# a config file, among its values: all must exist inside the container.
spin_container_paths_in() {
  [ -n "${SPIN_CONTAINER_IMAGE:-}" ] || return 0
  local arg value
  for arg in "$@"; do
    value=${arg#*=}
    case "$value" in /*) spin_container_path "$value" ;; esac
    if [ -f "$arg" ] && [[ "$arg" == *.yaml || "$arg" == *.yml ]]; then
      while read -r value; do
        spin_container_path "$value"
      done < <(grep -oE '^[^#]*:[[:space:]]+/[^[:space:]#]+' "$arg" | sed -E 's/^[^:]*:[[:space:]]+//')
    fi
  done
}

# SPIN_CONTAINER_ARGS: the pyxis options of every step: the image, every needed directory mounted at its
# own path (no home directory: it would shadow the image's and differs between users), and one named
# container per job, imported once and reused by all its steps and requeued attempts.
spin_container_args() {
  SPIN_CONTAINER_ARGS=()
  [ -n "${SPIN_CONTAINER_IMAGE:-}" ] || return 0
  spin_container_path "$SPIN_WORKDIR" "$SPIN_LAUNCH_DIR"
  [ -n "${SPIN_VENV:-}" ] && spin_container_path "$SPIN_VENV"
  local mounts="" dir
  for dir in $(printf '%s\n' "${SPIN_CONTAINER_DIRS[@]}" | sort -u); do
    mounts="${mounts:+$mounts,}$dir:$dir"
  done
  [ -n "${SPIN_CONTAINER_MOUNTS:-}" ] && mounts="$mounts,$SPIN_CONTAINER_MOUNTS"
  SPIN_CONTAINER_ARGS=(--container-image="$SPIN_CONTAINER_IMAGE" --container-mounts="$mounts"
    --container-workdir="$SPIN_WORKDIR" --no-container-mount-home
    --container-name="${SPIN_CONTAINER_NAME:-spin-${SLURM_JOB_ID:-job}}")
}

spin_check_container_support() {
  [ -n "${SPIN_CONTAINER_IMAGE:-}" ] || return 0
  [ "$SPIN_DRY_RUN" = 1 ] && return 0  # printing the command needs no pyxis
  srun --help 2>&1 | grep -q -- '--container-image' \
    || spin_die "SPIN_CONTAINER_IMAGE is set but this srun has no --container-image option (the pyxis plugin is not installed)"
}

# The sbatch arguments that turn the launch flags into a request: used by self-submission and spin_loop.sh.
# spin_sbatch_args STAGE -> SPIN_SBATCH (array).
spin_sbatch_args() {
  local stage=$1
  SPIN_SBATCH=(sbatch --parsable
    --job-name="${SPIN_JOB_NAME:-spin-$stage}"
    --nodes="$SPIN_NODES" --ntasks-per-node="$SPIN_TASKS_PER_NODE"
    --signal="B:USR1@$SPIN_SIGNAL_SECONDS" --requeue --open-mode=append
    --output="$SPIN_WORKDIR/logs/%x-%j.log"
    --export=ALL)
  [ "$SPIN_GPUS_PER_NODE" -gt 0 ] && SPIN_SBATCH+=(--gpus-per-node="$SPIN_GPUS_PER_NODE")
  [ "$SPIN_EXCLUSIVE" = 1 ] && SPIN_SBATCH+=(--exclusive)
  [ -n "${SPIN_MEM:-}" ] && SPIN_SBATCH+=(--mem="$SPIN_MEM")
  [ -n "${SPIN_CPUS_PER_TASK:-}" ] && SPIN_SBATCH+=(--cpus-per-task="$SPIN_CPUS_PER_TASK")
  [ -n "${SPIN_PARTITION:-}" ] && SPIN_SBATCH+=(--partition="$SPIN_PARTITION")
  [ -n "${SPIN_ACCOUNT:-}" ] && SPIN_SBATCH+=(--account="$SPIN_ACCOUNT")
  [ -n "${SPIN_QOS:-}" ] && SPIN_SBATCH+=(--qos="$SPIN_QOS")
  [ -n "${SPIN_TIME:-}" ] && SPIN_SBATCH+=(--time="$SPIN_TIME")
  [ -n "${SPIN_DEPENDENCY:-}" ] && SPIN_SBATCH+=(--dependency="$SPIN_DEPENDENCY" --kill-on-invalid-dep=yes)
  if [ -n "${SPIN_SBATCH_ARGS:-}" ]; then
    local extra
    read -r -a extra <<<"$SPIN_SBATCH_ARGS"
    SPIN_SBATCH+=("${extra[@]}")
  fi
  return 0
}

# Submits SCRIPT with the launch flags turned into sbatch options; prints the job id. The flags travel
# both as arguments (re-parsed in the job) and as exported SPIN_* variables (sbatch --export=ALL).
spin_submit() {
  local stage=$1 script=$2
  shift 2
  spin_sbatch_args "$stage"
  export SPIN_LAUNCH_DIR SPIN_WORKDIR SPIN_NODES SPIN_GPUS_PER_NODE SPIN_TASKS_PER_NODE SPIN_SIGNAL_SECONDS \
    SPIN_MAX_RESTARTS SPIN_TASK_EXIT_WAIT
  [ -n "${SPIN_PYTHON:-}" ] && export SPIN_PYTHON
  [ -n "${SPIN_VENV:-}" ] && export SPIN_VENV
  [ -n "${SPIN_CPUS_PER_TASK:-}" ] && export SPIN_CPUS_PER_TASK
  [ -n "${SPIN_CONTAINER_IMAGE:-}" ] && export SPIN_CONTAINER_IMAGE
  [ -n "${SPIN_CONTAINER_MOUNTS:-}" ] && export SPIN_CONTAINER_MOUNTS
  [ -n "${SPIN_CONTAINER_NAME:-}" ] && export SPIN_CONTAINER_NAME
  export SPIN_EXCLUSIVE
  [ -n "${SPIN_MEM:-}" ] && export SPIN_MEM
  # The job must not submit itself again.
  local arg args=()
  for arg in "$@"; do [ "$arg" = --submit ] || args+=("$arg"); done
  if [ "$SPIN_DRY_RUN" = 1 ]; then
    echo "${SPIN_SBATCH[*]} $script ${args[*]}"
    return 0
  fi
  # sbatch does not create the directory of --output; a job whose log cannot be opened fails silently.
  mkdir -p "$SPIN_WORKDIR/logs" || spin_die "cannot create $SPIN_WORKDIR/logs"
  local out
  out=$("${SPIN_SBATCH[@]}" "$script" "${args[@]+"${args[@]}"}") || spin_die "sbatch refused the job: ${out:-see the message above}"
  echo "${out%%;*}"
}

# Runs one srun step (SPIN_SRUN + the command) with preemption handling, and returns its exit status.
# SIGUSR1 (sbatch --signal=B:USR1@S, scancel --signal=USR1 --batch) and SIGTERM reaching the batch shell
# are both passed to srun as SIGUSR1, which srun relays to every task: srun itself answers SIGTERM by
# cancelling the step at once, which would kill the trainer in the middle of its checkpoint.
SPIN_PREEMPTED=0
_SPIN_REQUEUED=0
_spin_forward() {
  if [ "$_SPIN_REQUEUED" = 1 ]; then
    # Slurm ending this attempt after our own `scontrol requeue`.
    spin_log "attempt ${SLURM_RESTART_COUNT:-0} of job ${SLURM_JOB_ID:-} ends here (requeued)"
    exit "$SPIN_EX_TEMPFAIL"
  fi
  SPIN_PREEMPTED=1
  spin_log "received SIG$1: asking the ranks to checkpoint and stop (SIGUSR1 to srun)"
  if [ -n "${_SPIN_STEP_PID:-}" ]; then kill -USR1 "$_SPIN_STEP_PID" 2>/dev/null || true; fi
}
spin_install_traps() {
  trap '_spin_forward USR1' USR1
  trap '_spin_forward TERM' TERM
}

spin_run_step() {
  if [ "$SPIN_PREEMPTED" = 1 ]; then
    spin_log "preempted before the step started"
    return "$SPIN_EX_TEMPFAIL"
  fi
  spin_log "step: ${SPIN_SRUN[*]} $*"
  "${SPIN_SRUN[@]}" "$@" &
  _SPIN_STEP_PID=$!
  # `wait` returns early whenever a trapped signal arrives; keep waiting until srun is really gone,
  # then ask once more for the status bash kept for it.
  while kill -0 "$_SPIN_STEP_PID" 2>/dev/null; do wait "$_SPIN_STEP_PID"; done
  wait "$_SPIN_STEP_PID"
  local rc=$?
  _SPIN_STEP_PID=""
  spin_log "step exited with status $rc"
  if [ "$rc" -ne 0 ] && [ "$rc" -ne "$SPIN_EX_TEMPFAIL" ]; then
    local log
    for log in "$SPIN_LOG_DIR"/"${SPIN_STEP_NAME:-step}"-rank-*.log; do
      [ -s "$log" ] || continue
      echo "---- last lines of $log ----"
      tail -n 15 "$log"
    done
  fi
  return "$rc"
}

# After a step: requeue this job when it was preempted (status 75, or a signal for a stage that can
# simply be run again), otherwise exit with the step's status.
spin_finish() {
  local rc=$1 requeue_on_signal=${2:-0} what
  if [ "$rc" -eq "$SPIN_EX_TEMPFAIL" ] || { [ "$SPIN_PREEMPTED" = 1 ] && [ "$requeue_on_signal" = 1 ] && [ "$rc" -ne 0 ]; }; then
    if [ "${SLURM_RESTART_COUNT:-0}" -ge "$SPIN_MAX_RESTARTS" ]; then
      spin_log "preempted, but job $SLURM_JOB_ID was already restarted $SLURM_RESTART_COUNT times (SPIN_MAX_RESTARTS): not requeueing"
      exit "$SPIN_EX_TEMPFAIL"
    fi
    if [ -n "${SLURM_JOB_ID:-}" ]; then
      if [ "$rc" -eq "$SPIN_EX_TEMPFAIL" ]; then what="with its checkpoint saved"; else what="(step status $rc; the stage runs again)"; fi
      spin_log "preempted $what: requeueing job $SLURM_JOB_ID (restart $((${SLURM_RESTART_COUNT:-0} + 1)))"
      _SPIN_REQUEUED=1
      if scontrol requeue "$SLURM_JOB_ID"; then
        # Slurm signals this script as part of the requeue; the next attempt resumes where this one stopped.
        sleep 30 &
        wait $! 2>/dev/null
        exit "$SPIN_EX_TEMPFAIL"
      fi
      _SPIN_REQUEUED=0
      spin_log "could not requeue job $SLURM_JOB_ID (cancelled, or not a batch job); resubmit the same command to resume"
    fi
    exit "$SPIN_EX_TEMPFAIL"
  fi
  exit "$rc"
}

# spin_read_config CONFIG [ARGS...]: loads the run config the way the trainer will (the same --set
# overrides, --tp/--pp taking precedence) and sets SPIN_CFG_TP, SPIN_CFG_PP, SPIN_CFG_GBS, SPIN_CFG_MBS.
# A bad config thus fails here, in a second, not after the allocation's nodes have imported Megatron.
spin_read_config() {
  local config=$1 out
  shift
  [ -f "$config" ] || spin_die "config file $config does not exist"
  out=$("$SPIN_PYTHON" - "$config" "$@" <<'PY'
import sys
from spin_mega.config import load_config
from spin_mega.errors import SpinMegaError

config, args = sys.argv[1], sys.argv[2:]
overrides, i = [], 0
while i < len(args):
    a = args[i]
    if a == "--set" and i + 1 < len(args):
        overrides.append(args[i + 1]); i += 2; continue
    if a.startswith("--set="):
        overrides.append(a[len("--set="):])
    elif a in ("--tp", "--pp") and i + 1 < len(args):
        overrides.append(("parallel.tensor_parallel=" if a == "--tp" else "parallel.pipeline_parallel=") + args[i + 1]); i += 2; continue
    elif a.startswith(("--tp=", "--pp=")):
        key = "parallel.tensor_parallel" if a.startswith("--tp=") else "parallel.pipeline_parallel"
        overrides.append(key + "=" + a.split("=", 1)[1])
    i += 1
try:
    cfg = load_config(config, overrides)
except SpinMegaError as exc:
    print(f"spin-mega launch: error: config {config}: {exc}", file=sys.stderr)
    sys.exit(2)
print(cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel, cfg.train.global_batch_size, cfg.train.micro_batch_size)
PY
) || exit "$SPIN_EX_USAGE"
  read -r SPIN_CFG_TP SPIN_CFG_PP SPIN_CFG_GBS SPIN_CFG_MBS <<<"$out"
}

# spin_check_batch GBS MBS TP PP: every data-parallel rank must get whole micro-batches.
spin_check_batch() {
  local gbs=$1 mbs=$2 tp=$3 pp=$4 dp
  dp=$((SPIN_WORLD_SIZE / (tp * pp)))
  if [ $((gbs % (mbs * dp))) -ne 0 ]; then
    spin_die "global batch $gbs is not a multiple of micro batch $mbs x data parallel $dp (world $SPIN_WORLD_SIZE / (TP $tp x PP $pp))"
  fi
}


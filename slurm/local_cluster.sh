#!/usr/bin/env bash
# A real SLURM cluster on one machine, for keel's tests and for trying `keel slurm submit`:
# munged, slurmctld and N slurmd daemons, each slurmd a fake node (n1..nN) on its own port.
#
#   bash slurm/local_cluster.sh start     # install if needed (Debian, root), start, wait for idle nodes
#   bash slurm/local_cluster.sh status    # daemons, their PIDs and `sinfo`
#   bash slurm/local_cluster.sh env       # `export SLURM_CONF=...`: eval "$(bash slurm/local_cluster.sh env)"
#   bash slurm/local_cluster.sh stop      # cancel jobs, then stop exactly the daemons `start` started
#   bash slurm/local_cluster.sh install   # only install the Debian packages
#
# Everything (slurm.conf, munge key and socket, state, spool, logs, PID files) lives under
# KEEL_SLURM_DIR (default /tmp/keel-slurm); nothing under /etc is changed. Clients find the
# cluster through SLURM_CONF=$KEEL_SLURM_DIR/slurm.conf, which sbatch passes on to jobs.
# Settings: KEEL_SLURM_NODES (default 2), KEEL_SLURM_CPUS per node (default 1: a 2-node job fits
# on 2 cores), KEEL_SLURM_PORT (slurmctld's port, default 16817; node i listens on PORT+i),
# KEEL_SLURM_PARTITION (default debug).
# Runs as root without systemd or cgroups (proctrack/linuxproc, task/none). `start` clears the
# previous slurmctld state: this is a scratch cluster, not a place to keep jobs across restarts.
set -euo pipefail

DIR=${KEEL_SLURM_DIR:-/tmp/keel-slurm}
NODES=${KEEL_SLURM_NODES:-2}
CPUS=${KEEL_SLURM_CPUS:-1}
PORT=${KEEL_SLURM_PORT:-16817}
PARTITION=${KEEL_SLURM_PARTITION:-debug}
CONF=$DIR/slurm.conf
export SLURM_CONF=$CONF

say() { echo "local_cluster: $*"; }
die() { echo "local_cluster: error: $*" >&2; exit 1; }

# pid_alive run/NAME.pid: that daemon (slurmd for slurmd-n1.pid) runs under that PID.
pid_alive() {
  local name
  name=$(basename "$1" .pid)
  [ -f "$1" ] && [ "$(cat "/proc/$(cat "$1")/comm" 2>/dev/null)" = "${name%%-*}" ]
}

any_alive() { local pid; for pid in "$@"; do kill -0 "$pid" 2>/dev/null && return 0; done; return 1; }

node_names() { local i; for ((i = 1; i <= NODES; i++)); do echo "n$i"; done; }

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
      && command -v munged >/dev/null; then
    return 0
  fi
  command -v apt-get >/dev/null || die "slurm is not installed and there is no apt-get to install it"
  local sudo=""
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null && sudo -n true 2>/dev/null || die "installing slurm needs root (or sudo)"
    sudo="sudo -n"
  fi
  say "installing munge slurmctld slurmd slurm-client (Debian packages)"
  $sudo apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
    munge slurmctld slurmd slurm-client >/dev/null
}

write_conf() {
  local plugins
  plugins=$(dirname "$(find /usr/lib -name select_cons_tres.so -path '*slurm*' 2>/dev/null | head -n1)")
  {
    cat <<EOF
# Written by slurm/local_cluster.sh: a scratch cluster of $NODES fake nodes on one machine.
ClusterName=keel-local
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire is also how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=10
CredType=cred/munge
PluginDir=$plugins
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# No systemd, no cgroups: processes are tracked through /proc, tasks are not bound.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# No slurmdbd: finished jobs are recorded in a text file instead of sacct.
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.txt
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Look at the queue every 2 s, so a requeued job starts soon after it becomes eligible.
SchedulerParameters=sched_interval=2,bf_interval=2
MpiDefault=none
SwitchType=switch/none
# The nodes' CPUs are configured, not probed: any number of fake nodes fits on one machine.
SlurmdParameters=config_overrides
ReturnToService=2
# Preempted jobs (keel checkpoints, exits, and the job script runs scontrol requeue) go back in the queue.
JobRequeue=1
# Short waits: a test cluster should start and clean up jobs quickly.
KillWait=10
MessageTimeout=10
SlurmdTimeout=60
InactiveLimit=0
MinJobAge=600
EOF
    local i
    for ((i = 1; i <= NODES; i++)); do
      echo "NodeName=n$i NodeAddr=127.0.0.1 NodeHostname=localhost Port=$((PORT + i)) CPUs=$CPUS RealMemory=2048 State=UNKNOWN"
    done
    echo "PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
  } >"$CONF"
}

start_munge() {
  if pid_alive "$DIR/run/munged.pid"; then return 0; fi
  if [ ! -f "$DIR/munge/munge.key" ]; then
    mungekey --create --keyfile="$DIR/munge/munge.key" 2>/dev/null \
      || dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
  fi
  chmod 600 "$DIR/munge/munge.key"
  munged --force --socket="$DIR/munge/munge.socket" --key-file="$DIR/munge/munge.key" \
    --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed"
}

wait_for() {  # wait_for SECONDS WHAT COMMAND...
  local seconds=$1 what=$2 i
  shift 2
  for ((i = 0; i < seconds * 5; i++)); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  die "$what did not come up within ${seconds}s (logs: $DIR/log)"
}

all_nodes_idle() {
  local states
  states=$(sinfo -h -N -o '%T' 2>/dev/null) || return 1
  [ "$(grep -c -E '^(idle|mixed|allocated)' <<<"$states")" = "$NODES" ]
}

cmd_start() {
  install_packages
  mkdir -p "$DIR"/{munge,state,run,log} "$DIR"/spool
  chmod 700 "$DIR/munge"
  local node running=1
  pid_alive "$DIR/run/slurmctld.pid" || running=0
  for node in $(node_names); do pid_alive "$DIR/run/slurmd-$node.pid" || running=0; done
  if [ $running = 1 ] && pid_alive "$DIR/run/munged.pid"; then
    say "already running ($DIR)"
    wait_for 30 "the nodes" all_nodes_idle
    return 0
  fi
  write_conf
  start_munge
  if ! pid_alive "$DIR/run/slurmctld.pid"; then
    slurmctld -c -f "$CONF"  # -c: a fresh queue, never jobs left from an earlier cluster
  fi
  wait_for 30 slurmctld scontrol ping
  for node in $(node_names); do
    mkdir -p "$DIR/spool/$node"
    pid_alive "$DIR/run/slurmd-$node.pid" || slurmd -f "$CONF" -N "$node"
  done
  wait_for 30 "the nodes" all_nodes_idle
  say "started $NODES nodes in partition '$PARTITION' ($DIR)"
  say "use it with: export SLURM_CONF=$CONF"
}

cmd_status() {
  local name file state=0
  for name in munged slurmctld $(for n in $(node_names); do echo "slurmd-$n"; done); do
    file=$DIR/run/$name.pid
    if pid_alive "$file"; then echo "$name: running (pid $(cat "$file"))"; else echo "$name: stopped"; state=3; fi
  done
  if [ $state = 0 ]; then
    sinfo
    squeue
    echo "export SLURM_CONF=$CONF"
  fi
  return $state
}

cmd_stop() {
  if pid_alive "$DIR/run/slurmctld.pid"; then
    # Jobs first, so no slurmstepd outlives the daemons that started it.
    local jobs
    jobs=$(squeue -h -o %i 2>/dev/null || true)
    if [ -n "$jobs" ]; then
      # shellcheck disable=SC2086
      scancel $jobs 2>/dev/null || true
      for _ in $(seq 50); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.2; done
    fi
  fi
  # The slurm daemons together (each takes ~2 s to shut down), munged after them.
  stop_pids $(for n in $(node_names); do echo "slurmd-$n"; done) slurmctld
  stop_pids munged
}

stop_pids() {  # stop_pids NAME...: TERM the PIDs in run/NAME.pid, wait, KILL what is left
  local name file pid names=() pids=()
  for name in "$@"; do
    file=$DIR/run/$name.pid
    [ -f "$file" ] || continue
    pid=$(cat "$file")
    # Only the daemon this PID file names: never a process that got its PID since.
    if pid_alive "$file"; then
      kill "$pid" && names+=("$name") && pids+=("$pid")
    fi
    rm -f "$file"
  done
  [ ${#pids[@]} = 0 ] && return 0
  for _ in $(seq 100); do
    any_alive "${pids[@]}" || break
    sleep 0.1
  done
  local i
  for i in "${!pids[@]}"; do
    kill -0 "${pids[$i]}" 2>/dev/null && kill -9 "${pids[$i]}"
    say "stopped ${names[$i]} (pid ${pids[$i]})"
  done
}

case "${1:-}" in
  start) cmd_start ;;
  status) cmd_status ;;
  stop) cmd_stop ;;
  install) install_packages ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 start|status|stop|install|env   (state in KEEL_SLURM_DIR=$DIR)" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# A real two-node SLURM cluster on this one host, for the test suite and for development.
#
# Two slurmd daemons (nodes n1 and n2) share the host's cores; slurmctld schedules them,
# slurmdbd keeps accounting in a private MariaDB, munged signs the credentials. Everything
# listens on loopback (or on unix sockets) and every file the cluster writes lives under
# one folder, so `down` leaves the host as it found it (apart from the installed packages).
set -euo pipefail

readonly PROG=slurm/testcluster.sh
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly SCRIPT_DIR
readonly CLUSTER_NAME=oasis
readonly NODES=(n1 n2)
readonly SLURMD_PORTS=(6818 6819)
readonly CTLD_PORT=6817
readonly DBD_PORT=6830 # no slurmd may use it
readonly HOSTS_MARK="# oasis-ldm testcluster"
readonly UP_TIMEOUT_S=60
readonly STOP_TIMEOUT_S=15

readonly PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server gcc libc6-dev)
readonly BINARIES=(/usr/sbin/slurmctld /usr/sbin/slurmd /usr/sbin/slurmdbd /usr/bin/sbatch /usr/bin/srun
  /usr/bin/sacct /usr/bin/sacctmgr /usr/sbin/munged /usr/sbin/mariadbd /usr/bin/mariadb-install-db /usr/bin/gcc)

say() { printf 'testcluster: %s\n' "$*" >&2; }
die() {
  say "error: $*"
  exit 1
}

# One folder holds the whole cluster: configs, spool and state dirs, logs, pid files, the database.
cluster_dir() {
  local dir
  dir=$(realpath -m -- "${OASIS_SLURM_DIR:-$SCRIPT_DIR/.cluster}")
  [[ $dir != / ]] || die "OASIS_SLURM_DIR must not be /"
  # slurm.conf has no quoting: a blank would split its paths.
  [[ $dir != *[[:space:]]* ]] || die "the cluster folder '$dir' contains a blank; set OASIS_SLURM_DIR"
  printf '%s\n' "$dir"
}
D=$(cluster_dir)
readonly D
readonly CONF=$D/etc/slurm.conf
readonly DBD_CONF=$D/etc/slurmdbd.conf
readonly MUNGE_DIR=$D/munge
readonly MUNGE_KEY=$MUNGE_DIR/munge.key
readonly MUNGE_SOCKET=$MUNGE_DIR/munge.socket
readonly DB_DIR=$D/db
readonly DB_SOCKET=$DB_DIR/mysqld.sock
readonly RUN=$D/run
readonly LOG=$D/log

usage() {
  cat <<EOF
Usage: $PROG {install|up|down|env|status} [-h|--help]

A real two-node SLURM cluster (nodes n1 and n2, partition "debug") on this host.

Commands:
  install  apt-get install SLURM 22.05 (slurmctld, slurmd, slurmdbd, clients), munge and
           MariaDB; a no-op when they are already there. Needs root.
  up       start munged, MariaDB, slurmdbd, slurmctld and two slurmd from a clean state (job
           ids start at 1), add "127.0.0.1 n1 n2" to /etc/hosts, and wait until both nodes
           are idle and sacct answers. A no-op when the cluster is already up. Needs root.
  down     cancel all jobs, stop every daemon that 'up' started, remove the /etc/hosts line.
           Succeeds when the cluster is only partly up or already down. Needs root.
  env      print 'export SLURM_CONF=... GLOO_SOCKET_IFNAME=lo' for clients and jobs:  eval "\$($PROG env)"
  status   print each daemon's state and sinfo; exit status 0 only when all are running.

Options:
  -h, --help  show this help and exit

Environment:
  OASIS_SLURM_DIR  folder for all cluster state (default: slurm/.cluster next to this script)

Ports on 127.0.0.1: slurmctld $CTLD_PORT, slurmd ${SLURMD_PORTS[*]}, slurmdbd $DBD_PORT.
EOF
}

# Print the last lines of each log that exists, so a failed start explains itself.
tail_logs() {
  local f
  for f in "$@"; do
    [[ -s $f ]] || continue
    printf -- '--- last lines of %s ---\n' "$f" >&2
    tail -n 15 "$f" >&2
  done
}

die_with_logs() {
  local msg=$1
  shift
  say "error: $msg"
  tail_logs "$@"
  exit 1
}

require_root() {
  [[ $EUID -eq 0 ]] || die "'$1' must run as root (it manages system daemons and /etc/hosts)"
}

all_installed() {
  local b
  for b in "${BINARIES[@]}"; do [[ -x $b ]] || return 1; done
}

cmd_install() {
  require_root install
  if all_installed; then
    say "SLURM, munge and MariaDB are already installed"
    return 0
  fi
  export DEBIAN_FRONTEND=noninteractive
  local apt=(apt-get install -y -q --no-install-recommends "${PACKAGES[@]}")
  if ! "${apt[@]}"; then
    say "apt-get install failed; refreshing the package lists and retrying"
    apt-get update -q
    "${apt[@]}"
  fi
  all_installed || die "packages installed but a binary is still missing (one of: ${BINARIES[*]})"
}

# ---------------------------------------------------------------- process bookkeeping

# A pid file names a live process of the expected program (guards against pid reuse).
pid_alive() {
  local pidfile=$1 comm=$2 pid
  [[ -s $pidfile ]] || return 1
  pid=$(<"$pidfile")
  [[ $pid =~ ^[0-9]+$ && -r /proc/$pid/comm ]] || return 1
  [[ $(<"/proc/$pid/comm") == "$comm" ]]
}

# "pidfile comm log" for every daemon, in start order (cluster_dir allows no blanks).
DAEMONS=("$MUNGE_DIR/munged.pid munged $MUNGE_DIR/munged.log"
  "$DB_DIR/mariadbd.pid mariadbd $LOG/mariadbd.log"
  "$RUN/slurmdbd.pid slurmdbd $LOG/slurmdbd.log"
  "$RUN/slurmctld.pid slurmctld $LOG/slurmctld.log")
for node in "${NODES[@]}"; do DAEMONS+=("$RUN/slurmd-$node.pid slurmd $LOG/slurmd-$node.log"); done
readonly DAEMONS

all_running() {
  local entry pidfile comm log
  for entry in "${DAEMONS[@]}"; do
    read -r pidfile comm log <<<"$entry"
    pid_alive "$pidfile" "$comm" || return 1
  done
}

any_running() {
  local entry pidfile comm log
  for entry in "${DAEMONS[@]}"; do
    read -r pidfile comm log <<<"$entry"
    pid_alive "$pidfile" "$comm" && return 0
  done
  return 1
}

# Fail fast, with its log, when a daemon we started has died.
check_daemons_alive() {
  local entry pidfile comm log
  for entry in "${DAEMONS[@]}"; do
    read -r pidfile comm log <<<"$entry"
    [[ -e $pidfile ]] || continue
    pid_alive "$pidfile" "$comm" || die_with_logs "$comm exited during start-up" "$log"
  done
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Run a command every 0.2 s until it succeeds; return 1 after timeout seconds, leaving
# the last attempt's output in LAST_OUTPUT for the error message.
LAST_OUTPUT=
wait_for() {
  local timeout=$1 deadline
  shift
  deadline=$((SECONDS + timeout))
  until LAST_OUTPUT=$("$@" 2>&1); do
    ((SECONDS < deadline)) || return 1
    check_daemons_alive
    sleep 0.2
  done
}

# ---------------------------------------------------------------- configuration

write_slurm_conf() {
  local cpus mem_mb i
  cpus=$(nproc)
  # Each slurmd sees the whole host and checks its node's CPUs/RealMemory against it; both
  # nodes may claim all cores (SLURM does not know they are shared), so a 2-task job fits
  # on one node and a 2-node job fits on the two. Memory is not a scheduled resource here.
  mem_mb=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
  cat >"$CONF" <<EOF
# Generated by $PROG up; rewritten on every start.
ClusterName=$CLUSTER_NAME
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job waits this long before it may start again (default 120 s).
AuthInfo=cred_expire=10,socket=$MUNGE_SOCKET
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
StateSaveLocation=$D/state/slurmctld
SlurmdSpoolDir=$D/state/slurmd-%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=1
JobRequeue=1
ReturnToService=2
KillWait=5
InactiveLimit=0
MinJobAge=300
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
# For slurmdbd connections the clients take munged's socket from here, not from AuthInfo.
AccountingStoragePass=$MUNGE_SOCKET
JobCompType=jobcomp/none
EOF
  for i in "${!NODES[@]}"; do
    echo "NodeName=${NODES[$i]} NodeHostname=localhost NodeAddr=127.0.0.1 Port=${SLURMD_PORTS[$i]}" \
      "CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN" >>"$CONF"
  done
  local nodelist
  nodelist=$(IFS=,; echo "${NODES[*]}")
  echo "PartitionName=debug Nodes=$nodelist Default=YES MaxTime=INFINITE State=UP" >>"$CONF"
}

write_slurmdbd_conf() {
  # slurmdbd refuses a config that others can read: it may hold the database password.
  (
    umask 077
    cat >"$DBD_CONF" <<EOF
# Generated by $PROG up; rewritten on every start.
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$RUN/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc=slurm_acct_db
EOF
  )
  chmod 0600 "$DBD_CONF"
}

# The cluster folder carries this file, so that a mistyped OASIS_SLURM_DIR (say, /) is
# never wiped by 'up' nor has its pid files (/run/*.pid) acted on by 'down'.
ours() { [[ -f $D/.testcluster ]]; }

claim_dir() {
  if [[ -d $D ]] && ! ours && [[ -n $(ls -A "$D") ]]; then
    die "$D is not empty and was not made by $PROG: choose another OASIS_SLURM_DIR"
  fi
  mkdir -p "$D"
  echo "State of the SLURM test cluster ($PROG); 'up' wipes it." >"$D/.testcluster"
}

# Start from a clean slate so that every boot behaves alike; the munge key survives.
reset_state() {
  rm -rf "${D:?}/etc" "$D/state" "$RUN" "$LOG" "$DB_DIR" "$D/lib"
  rm -f "$MUNGE_DIR"/munged.* "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
  mkdir -p "$D/etc" "$D/state/slurmctld" "$RUN" "$LOG" "$DB_DIR/tmp"
  local n
  for n in "${NODES[@]}"; do mkdir -p "$D/state/slurmd-$n"; done
  # munged insists that others can reach its socket's folder.
  install -d -m 0755 "$MUNGE_DIR"
}

check_preconditions() {
  all_installed || die "SLURM is not installed: run '$PROG install' first"
  local sock port
  for sock in "$MUNGE_SOCKET" "$DB_SOCKET"; do
    ((${#sock} < 100)) || die "OASIS_SLURM_DIR is too long for a unix socket path: $sock"
  done
  for port in "$CTLD_PORT" "${SLURMD_PORTS[@]}" "$DBD_PORT"; do
    if port_open "$port"; then
      die "port $port on 127.0.0.1 is already in use (another SLURM? see: ss -ltnp 'sport = :$port')"
    fi
  done
}

add_hosts_line() {
  remove_hosts_line
  # Append in place: /etc/hosts may be a bind mount that cannot be replaced by a rename.
  if [[ -s /etc/hosts && -n $(tail -c 1 /etc/hosts) ]]; then echo >>/etc/hosts; fi
  echo "127.0.0.1 ${NODES[*]} $HOSTS_MARK" >>/etc/hosts
}

remove_hosts_line() {
  grep -qF "$HOSTS_MARK" /etc/hosts || return 0
  local kept
  kept=$(grep -vF "$HOSTS_MARK" /etc/hosts || true)
  printf '%s\n' "$kept" >/etc/hosts
}

# ---------------------------------------------------------------- daemons

start_munge() {
  if [[ ! -s $MUNGE_KEY ]]; then
    (umask 077 && head -c 128 /dev/urandom >"$MUNGE_KEY")
  fi
  chmod 0400 "$MUNGE_KEY"
  # As root with its own root-owned files munged is safe; --force turns its check that
  # every parent folder is world-searchable (false for a clone under /root) into a warning.
  /usr/sbin/munged --force --socket="$MUNGE_SOCKET" --key-file="$MUNGE_KEY" \
    --pid-file="$MUNGE_DIR/munged.pid" --log-file="$MUNGE_DIR/munged.log" \
    --seed-file="$MUNGE_DIR/munged.seed" </dev/null >>"$LOG/munged.out" 2>&1 ||
    die_with_logs "munged did not start" "$LOG/munged.out" "$MUNGE_DIR/munged.log"
  wait_for 10 test -S "$MUNGE_SOCKET" || die_with_logs "munged made no socket" "$MUNGE_DIR/munged.log"
}

readonly MARIADB_OPTS=(--no-defaults --user=root "--datadir=$DB_DIR/data" "--tmpdir=$DB_DIR/tmp"
  --innodb-buffer-pool-size=512M --innodb-log-file-size=64M --innodb-lock-wait-timeout=900)

start_mariadb() {
  mariadb-install-db "${MARIADB_OPTS[@]}" --auth-root-authentication-method=socket --skip-test-db \
    </dev/null >"$LOG/mariadb-install.log" 2>&1 ||
    die_with_logs "mariadb-install-db failed" "$LOG/mariadb-install.log"
  # No TCP at all: slurmdbd reaches it through the socket named by MYSQL_UNIX_PORT.
  setsid /usr/sbin/mariadbd "${MARIADB_OPTS[@]}" --skip-networking "--socket=$DB_SOCKET" \
    "--pid-file=$DB_DIR/mariadbd.pid" "--log-error=$LOG/mariadbd.log" </dev/null >>"$LOG/mariadbd.log" 2>&1 &
  wait_for 30 grep -q 'ready for connections' "$LOG/mariadbd.log" ||
    die_with_logs "MariaDB did not become ready" "$LOG/mariadbd.log"
}

# slurmdbd has no bind-address option and listens on 0.0.0.0; a small LD_PRELOAD shim turns
# that wildcard bind into a loopback one (slurm/bind_loopback.c).
build_bind_shim() {
  mkdir -p "$D/lib"
  gcc -shared -fPIC -O2 -o "$D/lib/bind_loopback.so" "$SCRIPT_DIR/bind_loopback.c" -ldl \
    >"$LOG/bind_loopback.log" 2>&1 || die_with_logs "could not build the loopback shim" "$LOG/bind_loopback.log"
}

start_slurmdbd() {
  build_bind_shim
  LD_PRELOAD=$D/lib/bind_loopback.so MYSQL_UNIX_PORT=$DB_SOCKET /usr/sbin/slurmdbd </dev/null \
    >>"$LOG/slurmdbd.out" 2>&1 ||
    die_with_logs "slurmdbd did not start" "$LOG/slurmdbd.out" "$LOG/slurmdbd.log"
  wait_for 30 sacctmgr -n show cluster ||
    die_with_logs "slurmdbd does not answer on port $DBD_PORT; sacctmgr says:
$(tail -n 3 <<<"$LAST_OUTPUT")" "$LOG/slurmdbd.log"
  local clusters
  clusters=$(sacctmgr -n -P show cluster format=cluster)
  if [[ $'\n'$clusters$'\n' != *$'\n'$CLUSTER_NAME$'\n'* ]]; then
    sacctmgr -i add cluster "$CLUSTER_NAME" >"$LOG/sacctmgr.log" 2>&1 ||
      die_with_logs "could not register cluster $CLUSTER_NAME" "$LOG/sacctmgr.log" "$LOG/slurmdbd.log"
  fi
}

start_slurm() {
  /usr/sbin/slurmctld -f "$CONF" </dev/null >>"$LOG/slurmctld.out" 2>&1 ||
    die_with_logs "slurmctld did not start" "$LOG/slurmctld.out" "$LOG/slurmctld.log"
  local n
  for n in "${NODES[@]}"; do
    /usr/sbin/slurmd -N "$n" -f "$CONF" </dev/null >>"$LOG/slurmd-$n.out" 2>&1 ||
      die_with_logs "slurmd for node $n did not start" "$LOG/slurmd-$n.out" "$LOG/slurmd-$n.log"
  done
}

# Wait until both nodes have registered and are idle; a node that slurmctld rejects (say,
# configured with more CPUs than the host has) fails at once instead of at the timeout.
wait_nodes_idle() {
  local deadline=$((SECONDS + UP_TIMEOUT_S)) states want
  want=$(printf '%s idle\n' "${NODES[@]}")
  while :; do
    states=$(sinfo -h -N -o '%N %T' 2>&1 | sort -u) || true
    [[ $states != "$want" ]] || return 0
    if [[ $states == *inval* || $states == *drain* ]] || ((SECONDS >= deadline)); then
      die_with_logs "nodes ${NODES[*]} are not idle:
$(sinfo -N -o '%N %T %E' 2>&1 || true)" "$LOG/slurmctld.log" "$LOG/slurmd-${NODES[0]}.log" \
        "$LOG/slurmd-${NODES[1]}.log"
    fi
    check_daemons_alive
    sleep 0.2
  done
}

# sacct answers and slurmctld has registered with slurmdbd (so jobs will be recorded).
accounting_ready() {
  sacct -n -a -X --starttime=now >/dev/null || return 1
  local host
  host=$(sacctmgr -n -P show cluster "$CLUSTER_NAME" format=controlhost)
  [[ -n $host ]]
}

wait_ready() {
  wait_nodes_idle
  wait_for 30 accounting_ready || die_with_logs "accounting (sacct) not ready after 30s:
$(tail -n 3 <<<"$LAST_OUTPUT")" "$LOG/slurmdbd.log" "$LOG/slurmctld.log"
}

cmd_up() {
  require_root up
  # A closed stdout/stderr (`up | head`) must not kill us before the clean-up trap runs.
  trap '' PIPE
  export SLURM_CONF=$CONF
  if ours && all_running && nodes_idle_or_busy; then
    say "already up (eval \"\$($PROG env)\" to use it)"
    return 0
  fi
  if ours && any_running; then
    say "partly up: stopping the remains first"
    stop_all
  fi
  check_preconditions
  claim_dir
  trap 'say "start-up failed: stopping what was started"; stop_all >/dev/null 2>&1 || true' EXIT
  reset_state
  write_slurm_conf
  write_slurmdbd_conf
  add_hosts_line
  start_munge
  start_mariadb
  start_slurmdbd
  start_slurm
  wait_ready
  trap - EXIT
  say "up: nodes ${NODES[*]} idle, accounting on; eval \"\$($PROG env)\" to use it"
}

# The cluster answers: slurmctld knows both nodes (whatever they are running).
nodes_idle_or_busy() {
  local n
  n=$(sinfo -h -N -o '%N' 2>/dev/null | sort -u | wc -l)
  ((n == ${#NODES[@]}))
}

# Cancel every job so that no slurmstepd or job process outlives its slurmd.
cancel_all_jobs() {
  pid_alive "$RUN/slurmctld.pid" slurmctld || return 0
  local ids
  ids=$(squeue -h -o %A 2>/dev/null || true)
  [[ -n $ids ]] || return 0
  # shellcheck disable=SC2086
  scancel $ids 2>/dev/null || true
  local deadline=$((SECONDS + STOP_TIMEOUT_S))
  while [[ -n $(squeue -h -o %A 2>/dev/null || true) ]] && ((SECONDS < deadline)); do sleep 0.2; done
}

# TERM the given processes, wait for them to exit; KILL what is left after timeout seconds.
stop_processes() {
  local timeout=$1 pid
  shift
  (($#)) || return 0
  kill -TERM "$@" 2>/dev/null || true
  local deadline=$((SECONDS + timeout))
  for pid in "$@"; do
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  # A killed process holds its ports until it is gone.
  deadline=$((SECONDS + 5))
  for pid in "$@"; do
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
  done
}

# Stop the processes named by live pid files, given as "pidfile comm" pairs.
stop_pidfiles() {
  local pids=()
  while (($#)); do
    if pid_alive "$1" "$2"; then pids+=("$(<"$1")"); fi
    shift 2
  done
  stop_processes "$STOP_TIMEOUT_S" "${pids[@]}"
}

# Processes of this cluster that no pid file names: daemons whose folder was deleted under
# them, job steps and job tasks. 'up' exports SLURM_CONF to every daemon and slurmstepd
# sets it in every job, so it marks them all; a shell that merely ran `eval "$(... env)"`
# has no SLURM_JOB_ID and is spared.
stray_pids() {
  local p pid comm env IFS=$'\n'
  local -a vars
  for p in /proc/[0-9]*; do
    pid=${p#/proc/}
    [[ $pid != "$$" && $pid != "$BASHPID" ]] || continue
    read -r comm 2>/dev/null <"$p/comm" || continue
    mapfile -d '' -t vars 2>/dev/null <"$p/environ" || continue
    env="${vars[*]}"
    [[ $'\n'$env$'\n' == *$'\n'"SLURM_CONF=$CONF"$'\n'* ]] || continue
    case $comm in
      slurmd | slurmctld | slurmdbd | slurmstepd | mariadbd | munged) echo "$pid" ;;
      *) [[ $'\n'$env != *$'\n'SLURM_JOB_ID=* ]] || echo "$pid" ;;
    esac
  done
}

stop_all() {
  export SLURM_CONF=$CONF
  if ours; then
    cancel_all_jobs
    local slurmd=() n
    for n in "${NODES[@]}"; do slurmd+=("$RUN/slurmd-$n.pid" slurmd); done
    # Two waves, as each daemon takes 2-3 s to exit: SLURM first, then what it depends on.
    stop_pidfiles "${slurmd[@]}" "$RUN/slurmctld.pid" slurmctld "$RUN/slurmdbd.pid" slurmdbd
    stop_pidfiles "$DB_DIR/mariadbd.pid" mariadbd "$MUNGE_DIR/munged.pid" munged
  fi
  # Also catches daemons whose folder was deleted under them (git clean while up).
  local strays
  mapfile -t strays < <(stray_pids)
  if ((${#strays[@]})); then
    say "stopping stray processes of this cluster: ${strays[*]}"
    stop_processes 5 "${strays[@]}" # slurmstepd ignores TERM
  fi
  remove_hosts_line
}

cmd_down() {
  require_root down
  trap '' PIPE
  stop_all
  say "down"
}

cmd_env() {
  printf 'export SLURM_CONF=%q\n' "$CONF"
  # gloo would otherwise pick the interface of the host name's address; jobs inherit this.
  printf 'export GLOO_SOCKET_IFNAME=lo\n'
}

cmd_status() {
  export SLURM_CONF=$CONF
  local entry pidfile comm log state rc=0
  for entry in "${DAEMONS[@]}"; do
    read -r pidfile comm log <<<"$entry"
    if pid_alive "$pidfile" "$comm"; then state="running (pid $(<"$pidfile"))"; else
      state=stopped
      rc=1
    fi
    printf '%-28s %s\n' "$(basename "$pidfile" .pid)" "$state"
  done
  if pid_alive "$RUN/slurmctld.pid" slurmctld; then sinfo -N -l || rc=1; fi
  return "$rc"
}

main() {
  case ${1:-} in
    -h | --help) usage ;;
    install | up | down | env | status)
      (($# == 1)) || die "'$1' takes no arguments (see --help)"
      "cmd_$1"
      ;;
    "") die "no command given (see --help)" ;;
    *) die "unknown command '$1' (see --help)" ;;
  esac
}

main "$@"

#!/usr/bin/env bash
# Train on several machines: SLOTS Horovod workers on each host of HOSTS, over ssh.
#
#   HOSTS=node1,node2 launch/run_multinode.sh [CONFIG] [TRAINER ARGS...]
#
#   HOSTS=gpu01,gpu02 SLOTS=4 launch/run_multinode.sh recipes/cifar10/<recipe>.yaml
#   HOSTS=gpu01:4,gpu02:2 NETWORK_INTERFACE=ib0 launch/run_multinode.sh ...
#   DRY_RUN=1 HOSTS=a,b launch/run_multinode.sh      # print the command, run nothing
#
# Needs: passwordless ssh from this host to every host, the repository and the Python
# environment at the same paths on every host (a shared file system), and the data under the
# same data.root on every host. horovodrun starts each worker in the current directory with
# this shell's environment (PATH, so an activated venv, and the variables of cluster_env.sh).
#
# CONFIG defaults to $CONFIG, else recipes/demo/digits.yaml (a first argument that starts with
# "-" is a trainer argument). Arguments after CONFIG go to the trainer.
# Environment (defaults in brackets):
#   HOSTS             comma-separated hosts, each optionally host:slots [required]
#   SLOTS             workers per host without ":slots" (one per GPU) [4, as in the paper]
#   NP                total workers [the sum of the slots]
#   NETWORK_INTERFACE NIC for Horovod's traffic, e.g. ib0 or eth0 (--network-interface) [auto]
#   CONTROLLER        gloo | mpi | auto (horovodrun picks) [gloo]
#   CLUSTER_ENV       file sourced first; empty to skip [launch/cluster_env.sh]
#   TRAIN, HOROVODRUN, HOROVODRUN_ARGS, DRY_RUN=1   as in run_local.sh
#   HOROVOD_CYCLE_TIME  Horovod's background cycle in ms [20: hvd-easgd's setting for EASGD
#                     jobs, hvd_easgd/optim/tuning.py; Horovod's own default is 1]; a recipe's
#                     horovod.cycle_time_ms replaces this default, never yours
#   HVD_EASGD_TUNE=0  export none of hvd-easgd's Horovod settings (keep Horovod's defaults)
set -euo pipefail

die() { echo "run_multinode.sh: $*" >&2; exit 2; }

CONFIG="${CONFIG:-recipes/demo/digits.yaml}"
if [[ $# -gt 0 && "$1" != -* ]]; then CONFIG="$1"; shift; fi
[[ -n "${HOSTS:-}" ]] || die "set HOSTS, e.g. HOSTS=node1,node2 (or node1:4,node2:4)"
SLOTS="${SLOTS:-4}"
[[ "$SLOTS" =~ ^[1-9][0-9]*$ ]] || die "SLOTS must be a positive integer, got '$SLOTS'"
CONTROLLER="${CONTROLLER:-gloo}"
CLUSTER_ENV="${CLUSTER_ENV-$(dirname "${BASH_SOURCE[0]}")/cluster_env.sh}"
read -r -a train_cmd <<< "${TRAIN:-hvd-easgd-train}"
read -r -a extra <<< "${HOROVODRUN_ARGS:-}"

host_list=()
total=0
IFS=',' read -r -a entries <<< "$HOSTS"
for entry in "${entries[@]}"; do
    entry="${entry// /}"
    [[ -n "$entry" ]] || continue
    if [[ "$entry" == *:* ]]; then host="${entry%%:*}"; n="${entry##*:}"; else host="$entry"; n="$SLOTS"; fi
    [[ -n "$host" && "$n" =~ ^[1-9][0-9]*$ ]] || die "bad host entry '$entry' (want host or host:slots)"
    host_list+=("$host:$n")
    total=$((total + n))
done
[[ ${#host_list[@]} -gt 0 ]] || die "HOSTS lists no host"
NP="${NP:-$total}"
[[ "$NP" =~ ^[1-9][0-9]*$ ]] || die "NP must be a positive integer, got '$NP'"
(( NP <= total )) || die "NP=$NP workers do not fit in $total slots ($HOSTS)"
hosts_arg="$(IFS=','; echo "${host_list[*]}")"

case "$CONTROLLER" in
    gloo) controller=(--gloo) ;; mpi) controller=(--mpi) ;; auto) controller=() ;;
    *) die "CONTROLLER must be gloo, mpi or auto, got '$CONTROLLER'" ;;
esac
nic=()
[[ -z "${NETWORK_INTERFACE:-}" ]] || nic=(--network-interface "$NETWORK_INTERFACE")
if [[ -n "$CLUSTER_ENV" ]]; then
    [[ -f "$CLUSTER_ENV" ]] || die "CLUSTER_ENV=$CLUSTER_ENV does not exist (set CLUSTER_ENV= to skip)"
    # shellcheck source=cluster_env.sh
    source "$CLUSTER_ENV"
fi

# hvd-easgd's Horovod settings for EASGD jobs (hvd_easgd/optim/tuning.py: one allreduce every tau
# steps, so Horovod's background thread need not wake and negotiate every millisecond). A value
# exported before (or by CLUSTER_ENV) wins; horovodrun passes them on to every worker. Our
# defaults are named in HVD_EASGD_DEFAULTED: the trainer replaces them by a recipe's.
tuned=()
case "$(echo "${HVD_EASGD_TUNE:-1}" | tr '[:upper:]' '[:lower:]' | tr -d '[:space:]')" in
    0|false|no|off) ;;
    *) if [[ -z "${HOROVOD_CYCLE_TIME+x}" ]]; then  # our default: a recipe's horovod: may replace it
           export HOROVOD_CYCLE_TIME=20
           export HVD_EASGD_DEFAULTED="${HVD_EASGD_DEFAULTED:+$HVD_EASGD_DEFAULTED,}HOROVOD_CYCLE_TIME"
       fi
       tuned+=("HOROVOD_CYCLE_TIME=$HOROVOD_CYCLE_TIME") ;;
esac

# Print a command as one shell line (quoting only the words that need it).
show_cmd() {
    local out="" a q="'"
    for a in "$@"; do
        if [[ "$a" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then out+=" $a"; else out+=" '${a//$q/$q\\$q$q}'"; fi
    done
    echo "${out# }"
}

cmd=("${HOROVODRUN:-horovodrun}" -np "$NP" -H "$hosts_arg" "${controller[@]}" "${nic[@]}"
     "${extra[@]}" "${train_cmd[@]}" --config "$CONFIG" "$@")
if [[ "${DRY_RUN:-0}" == 1 ]]; then
    [[ ${#tuned[@]} -eq 0 ]] || echo "# Horovod settings (exported): ${tuned[*]}" >&2
    show_cmd "${cmd[@]}"
else
    exec "${cmd[@]}"
fi

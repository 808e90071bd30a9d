#!/usr/bin/env bash
# Elastic training (Horovod Elastic): workers may die, or be added, while the job runs.
#
#   launch/run_elastic.sh [CONFIG] [TRAINER ARGS...]
#
#   launch/run_elastic.sh recipes/demo/digits_elastic.yaml        # hosts from launch/hosts.txt
#   HOSTS_FILE=/etc/my_hosts MIN_NP=4 MAX_NP=16 launch/run_elastic.sh recipes/cifar10/<recipe>.yaml
#   DRY_RUN=1 launch/run_elastic.sh                                # print the command only
#
# Horovod asks DISCOVERY every few seconds which hosts may run workers (one `host:slots` line
# each); the example launch/discover_hosts.sh prints the lines of HOSTS_FILE, so editing that
# file grows or shrinks the job. A worker that fails (even SIGKILL) costs the survivors the
# steps since the last commit (elastic.commit_every); its host is blacklisted for a cooldown
# (BLACKLIST_COOLDOWN), then may run a worker again, which joins from the center. The trainer
# runs with elastic.enabled=true: see docs/elastic-training.md.
#
# CONFIG defaults to $CONFIG, else recipes/demo/digits_elastic.yaml. Environment [defaults]:
#   HOSTS_FILE        host:slots lines for discover_hosts.sh [launch/hosts.txt]
#   DISCOVERY         the host discovery script [launch/discover_hosts.sh]
#   MIN_NP, MAX_NP    fewest / most workers [the recipe's elastic.min_np / max_np, else 1 / NP]
#   NP                workers to start with [MAX_NP, else the slots HOSTS_FILE lists]
#   NETWORK_INTERFACE NIC for Horovod's traffic (needed to start with a single host) [lo when
#                     every host is this machine, else auto]
#   ELASTIC_TIMEOUT   seconds to wait for MIN_NP workers after a failure [600]
#   BLACKLIST_COOLDOWN "MIN MAX": seconds a failed worker's host stays blacklisted before it may
#                     run a worker again (horovodrun --blacklist-cooldown-range; Horovod draws
#                     2-3 x MIN the first time and doubles it at each failure, up to MAX)
#                     [10 300]; "off": blacklisted for the rest of the job (Horovod's default)
#   CLUSTER_ENV, TRAIN, HOROVODRUN, HOROVODRUN_ARGS, DRY_RUN=1, HVD_EASGD_TUNE  as run_multinode.sh
set -euo pipefail

die() { echo "run_elastic.sh: $*" >&2; exit 2; }
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

CONFIG="${CONFIG:-recipes/demo/digits_elastic.yaml}"
if [[ $# -gt 0 && "$1" != -* ]]; then CONFIG="$1"; shift; fi
[[ -f "$CONFIG" ]] || die "no recipe $CONFIG"
export HOSTS_FILE="${HOSTS_FILE:-$here/hosts.txt}"
[[ -f "$HOSTS_FILE" ]] || die "no hosts file $HOSTS_FILE (one host:slots per line; set HOSTS_FILE)"
DISCOVERY="${DISCOVERY:-$here/discover_hosts.sh}"
[[ -x "$DISCOVERY" ]] || die "the discovery script $DISCOVERY is not executable"
read -r -a train_cmd <<< "${TRAIN:-hvd-easgd-train}"
read -r -a extra <<< "${HOROVODRUN_ARGS:-}"
CLUSTER_ENV="${CLUSTER_ENV:-}"
if [[ -n "$CLUSTER_ENV" ]]; then
    [[ -f "$CLUSTER_ENV" ]] || die "CLUSTER_ENV=$CLUSTER_ENV does not exist"
    # shellcheck source=cluster_env.sh
    source "$CLUSTER_ENV"
fi

cooldown=()
read -r -a cooldown_range <<< "${BLACKLIST_COOLDOWN-10 300}"
if [[ "${cooldown_range[*]:-off}" != off ]]; then
    [[ ${#cooldown_range[@]} == 2 && "${cooldown_range[0]}" =~ ^[1-9][0-9]*$ && "${cooldown_range[1]}" =~ ^[1-9][0-9]*$ ]] \
        && (( cooldown_range[0] <= cooldown_range[1] && cooldown_range[1] <= 3600 )) \
        || die "BLACKLIST_COOLDOWN must be 'MIN MAX' seconds (1 <= MIN <= MAX <= 3600) or 'off', got '${BLACKLIST_COOLDOWN}'"
    cooldown=(--blacklist-cooldown-range "${cooldown_range[@]}")
fi

# The recipe's elastic.min_np / max_np (python: the one of the environment that runs TRAIN).
read -r recipe_min recipe_max < <("${PYTHON:-python}" - "$CONFIG" <<'PY'
import sys
from hvd_easgd.train.config import load_config
e = load_config(sys.argv[1]).elastic
print(e.min_np or "-", e.max_np or "-")
PY
) || die "cannot read $CONFIG (is hvd-easgd installed in this environment?)"
slots=$("$DISCOVERY" | awk -F: '{s += ($2 == "" ? 1 : $2)} END {print s + 0}')
(( slots > 0 )) || die "$DISCOVERY lists no host"
MAX_NP="${MAX_NP:-$([[ $recipe_max != - ]] && echo "$recipe_max" || echo "$slots")}"
MIN_NP="${MIN_NP:-$([[ $recipe_min != - ]] && echo "$recipe_min" || echo 1)}"
NP="${NP:-$(( MAX_NP < slots ? MAX_NP : slots ))}"
for v in NP MIN_NP MAX_NP; do [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer, got '${!v}'"; done
(( MIN_NP <= NP && NP <= MAX_NP )) || die "need MIN_NP <= NP <= MAX_NP, got $MIN_NP <= $NP <= $MAX_NP"
if [[ -z "${NETWORK_INTERFACE:-}" ]] && ! "$DISCOVERY" | grep -qvE '^(localhost|127\.[0-9.]+)(:|$)'; then
    NETWORK_INTERFACE=lo  # every host is this machine
fi
nic=()
[[ -z "${NETWORK_INTERFACE:-}" ]] || nic=(--network-interface "$NETWORK_INTERFACE")
case "$(echo "${HVD_EASGD_TUNE:-1}" | tr '[:upper:]' '[:lower:]' | tr -d '[:space:]')" in
    0|false|no|off) ;;
    *) if [[ -z "${HOROVOD_CYCLE_TIME+x}" ]]; then  # our default: a recipe's horovod: may replace it
           export HOROVOD_CYCLE_TIME=20
           export HVD_EASGD_DEFAULTED="${HVD_EASGD_DEFAULTED:+$HVD_EASGD_DEFAULTED,}HOROVOD_CYCLE_TIME"
       fi ;;
esac

cmd=("${HOROVODRUN:-horovodrun}" -np "$NP" --min-np "$MIN_NP" --max-np "$MAX_NP"
     --host-discovery-script "$DISCOVERY" --elastic-timeout "${ELASTIC_TIMEOUT:-600}"
     "${cooldown[@]}" "${nic[@]}" "${extra[@]}" "${train_cmd[@]}" --config "$CONFIG" --set elastic.enabled=true "$@")
if [[ "${DRY_RUN:-0}" == 1 ]]; then
    echo "# HOSTS_FILE=$HOSTS_FILE" >&2
    printf '%q ' "${cmd[@]}"; echo
else
    exec "${cmd[@]}"
fi

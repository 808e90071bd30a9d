#!/usr/bin/env bash
# Train on one machine: NP Horovod workers on localhost.
#
#   launch/run_local.sh [CONFIG] [TRAINER ARGS...]
#
#   launch/run_local.sh                                       # the digits demo, 2 workers
#   NP=4 launch/run_local.sh recipes/cifar10/<recipe>.yaml --set data.root=/data/cifar10
#   DRY_RUN=1 launch/run_local.sh                             # print the command, run nothing
#
# CONFIG defaults to $CONFIG, else recipes/demo/digits.yaml (a first argument that starts with
# "-" is a trainer argument, not a config). Arguments after CONFIG go to the trainer.
# Environment (defaults in brackets):
#   NP               number of workers [2]; on a GPU machine, one per GPU
#   CONTROLLER       gloo | mpi | auto (horovodrun picks) [gloo]
#   TRAIN            the trainer command [hvd-easgd-train]
#   HOROVODRUN       the launcher [horovodrun]
#   HOROVODRUN_ARGS  extra horovodrun flags, e.g. "--start-timeout 120" []
#   CLUSTER_ENV      a file to source first, e.g. launch/cluster_env.sh on a GPU machine []
#   DRY_RUN=1        print the exact command instead of running it
#   HOROVOD_CYCLE_TIME  [20] and HVD_EASGD_TUNE=0 (export none of hvd-easgd's Horovod
#                    settings): see run_multinode.sh and hvd_easgd/optim/tuning.py
# This is run_multinode.sh with the single host localhost:NP.
set -euo pipefail

NP="${NP:-2}"
if ! [[ "$NP" =~ ^[1-9][0-9]*$ ]]; then
    echo "run_local.sh: NP must be a positive integer, got '$NP'" >&2; exit 2
fi
export HOSTS="localhost:$NP" NP CLUSTER_ENV="${CLUSTER_ENV:-}"
unset NETWORK_INTERFACE
exec "$(dirname "${BASH_SOURCE[0]}")/run_multinode.sh" "$@"

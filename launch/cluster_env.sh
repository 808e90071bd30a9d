#!/usr/bin/env bash
# The environment Horovod needs on a GPU cluster, for building it and for running it.
#
#   source launch/cluster_env.sh           # in a job script (run_multinode.sh and slurm.sbatch do)
#   eval "$(launch/cluster_env.sh)"        # in an interactive shell: prints `export` lines
#   launch/cluster_env.sh COMMAND ARGS...  # run one command in this environment
#   DRY_RUN=1 launch/cluster_env.sh COMMAND ARGS...   # print the command instead
#
# Every variable keeps the value you exported before; the values below are defaults only.
# Inputs: NETWORK_INTERFACE (e.g. ib0, eth0: the NIC for NCCL and Gloo traffic), SLOTS or
# SLURM_NTASKS_PER_NODE (workers per node, to split the CPU threads).
#
# Sourced, this file changes no shell option (a `set -e` would end an interactive shell at
# the first failing command); run as a program it uses `set -euo pipefail`.
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    set -euo pipefail
fi

_hvd_env_vars=()
_hvd_default() {  # _hvd_default NAME VALUE: export NAME=VALUE unless NAME is already set
    if [[ -z "${!1+x}" ]]; then export "$1=$2"; else export "${1?}"; fi
    _hvd_env_vars+=("$1")
}

# --- Building Horovod (read by `pip install horovod`, so by launch/setup.sh) -----------------
# A GPU build: collectives on GPU tensors through NCCL. Check with `horovodrun --check-build`:
# "[X] NCCL" under "Available Tensor Operations".
_hvd_default HOROVOD_GPU_OPERATIONS NCCL
_hvd_default HOROVOD_WITH_PYTORCH 1
_hvd_default HOROVOD_WITH_GLOO 1
_hvd_default HOROVOD_WITHOUT_TENSORFLOW 1
_hvd_default HOROVOD_WITHOUT_MXNET 1
# Where NCCL is not inside the CUDA toolkit: export HOROVOD_NCCL_HOME=/path/to/nccl.
# With an MPI installation: export HOROVOD_WITH_MPI=1 (then CONTROLLER=mpi works too).

# --- Network ----------------------------------------------------------------------------------
# With several NICs (say eth0 for ssh and ib0 for InfiniBand), tell NCCL and Gloo which one to
# use; the launchers also pass horovodrun --network-interface "$NETWORK_INTERFACE".
if [[ -n "${NETWORK_INTERFACE:-}" ]]; then
    _hvd_default NCCL_SOCKET_IFNAME "$NETWORK_INTERFACE"
    _hvd_default HOROVOD_GLOO_IFACE "$NETWORK_INTERFACE"
fi
_hvd_default NCCL_IB_DISABLE 0          # use InfiniBand (GPUDirect RDMA) where present
_hvd_default NCCL_DEBUG WARN            # INFO prints the transport NCCL chose (IB vs sockets)

# --- Horovod runtime --------------------------------------------------------------------------
# EASGD allreduces the same named tensors every tau steps: the response cache lets workers skip
# negotiation for them.
_hvd_default HOROVOD_CACHE_CAPACITY 1024
# Tensors are fused into buffers of this many bytes per allreduce (64 MiB; the ImageNet net's
# parameters are ~230 MB, so a round takes 4 fused allreduces).
_hvd_default HOROVOD_FUSION_THRESHOLD 67108864
# ms between Horovod's background cycles. Horovod's default is 1; EASGD makes one allreduce every
# tau steps, so hvd-easgd uses 20 (hvd_easgd/optim/tuning.py: fewer negotiation round trips and
# wake-ups competing with training, at most 20 ms of delay per round). HVD_EASGD_TUNE=0 leaves
# it to Horovod. On GPUs, for synchronous SGD (hvd.DistributedOptimizer) or sync EASGD with a
# small tau, export a shorter cycle (1-5 ms): there a step takes only tens of milliseconds.
case "$(echo "${HVD_EASGD_TUNE:-1}" | tr '[:upper:]' '[:lower:]' | tr -d '[:space:]')" in
    0|false|no|off) ;;
    *) if [[ -z "${HOROVOD_CYCLE_TIME+x}" ]]; then  # our default: a recipe's horovod: may replace it
           export HVD_EASGD_DEFAULTED="${HVD_EASGD_DEFAULTED:+$HVD_EASGD_DEFAULTED,}HOROVOD_CYCLE_TIME"
           _hvd_env_vars+=(HVD_EASGD_DEFAULTED)  # printed too: eval "$(launch/cluster_env.sh)"
       fi
       _hvd_default HOROVOD_CYCLE_TIME 20 ;;
esac
# Rendezvous and collectives on a busy cluster can take longer than Horovod's 30 s default.
_hvd_default HOROVOD_GLOO_TIMEOUT_SECONDS 120
# Profiling: export HOROVOD_TIMELINE=/path/timeline.json (view in chrome://tracing).

# --- CPU threads ------------------------------------------------------------------------------
# One worker per GPU: give each worker its share of the node's cores, not all of them.
_hvd_slots="${SLOTS:-${SLURM_NTASKS_PER_NODE:-4}}"
[[ "$_hvd_slots" =~ ^[1-9][0-9]*$ ]] || _hvd_slots=4
_hvd_cores="$(nproc 2>/dev/null || echo 4)"
_hvd_default OMP_NUM_THREADS "$(( _hvd_cores / _hvd_slots > 0 ? _hvd_cores / _hvd_slots : 1 ))"
unset _hvd_slots _hvd_cores

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    # Print a command as one shell line (quoting only the words that need it).
    show_cmd() {
        local out="" a q="'"
        for a in "$@"; do
            if [[ "$a" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then out+=" $a"; else out+=" '${a//$q/$q\\$q$q}'"; fi
        done
        echo "${out# }"
    }
    if [[ $# -eq 0 ]]; then
        for _v in "${_hvd_env_vars[@]}"; do printf 'export %s=%q\n' "$_v" "${!_v}"; done
    elif [[ "${DRY_RUN:-0}" == 1 ]]; then
        show_cmd "$@"
    else
        exec "$@"
    fi
fi
unset -f _hvd_default
unset _hvd_env_vars _v

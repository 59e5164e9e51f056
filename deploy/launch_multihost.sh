#!/usr/bin/env bash
# Start one host of a multi-host minisgl-jax server. Run it on every host, with the same flags:
#
#   NNODES=2 NODE_RANK=0 COORDINATOR=host0:8476 deploy/launch_multihost.sh --model Qwen/Qwen3-32B --tp 16
#   NNODES=2 NODE_RANK=1 COORDINATOR=host0:8476 deploy/launch_multihost.sh --model Qwen/Qwen3-32B --tp 16
#
#   NNODES       hosts in the job (default 1)
#   NODE_RANK    this host's rank, 0..NNODES-1 (default 0)
#   COORDINATOR  host:port of node 0 for jax.distributed; node 0 listens on that port.
#                Required when NNODES > 1.
#
# Node 0 serves the HTTP API (--host/--port); every host runs a scheduler over its local GPUs in
# lockstep with node 0, and the other hosts serve no HTTP. --tp is the total over all hosts:
# 2 hosts x 8 GPUs -> --tp 16. The remaining arguments are `python -m minisgl_jax` flags
# (--help lists them).
set -euo pipefail

NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
COORDINATOR="${COORDINATOR:-}"

case "$NNODES$NODE_RANK" in
  *[!0-9]*)
    echo "launch_multihost.sh: NNODES and NODE_RANK must be non-negative integers," \
      "got NNODES='$NNODES' NODE_RANK='$NODE_RANK'" >&2
    exit 2
    ;;
esac
if [ "$NNODES" -gt 1 ] && [ -z "$COORDINATOR" ]; then
  echo "launch_multihost.sh: COORDINATOR (host:port of node 0, for jax.distributed)" \
    "is required when NNODES=$NNODES > 1" >&2
  exit 2
fi

# NVLink multicast (NVLS) off unless asked for: the all-reduces of tensor parallelism do not
# need it, and on shared multi-GPU hosts it can put the GPUs out of service.
export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}"

exec python -m minisgl_jax --nnodes "$NNODES" --node-rank "$NODE_RANK" --coordinator "$COORDINATOR" "$@"

#!/bin/sh
# The job container's entrypoint. A Ray driver (agch-search, agch-ablate) must run on a node of its cluster, so the
# job first joins the cluster at $RAY_ADDRESS as a node that offers no CPUs or GPUs (trials go to the workers),
# then runs the command. `ray stop` at the end stops only this container's Ray processes.
set -eu
: "${RAY_ADDRESS:?RAY_ADDRESS must name the Ray head, e.g. ray-head:6379}"
ray start --address="$RAY_ADDRESS" --num-cpus=0 --num-gpus=0 --object-store-memory=500000000 --disable-usage-stats
status=0
"$@" || status=$?
ray stop >/dev/null 2>&1 || true
exit "$status"

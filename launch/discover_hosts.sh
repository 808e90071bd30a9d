#!/usr/bin/env bash
# Host discovery for elastic horovodrun (`--host-discovery-script`): prints one `host:slots`
# line per host that may run workers now. Horovod calls it every few seconds; editing the file
# it reads grows or shrinks the job while it runs.
#
#   HOSTS_FILE  a file with one `host:slots` per line (# comments and blank lines ignored)
#               [launch/hosts.txt next to this script]
#
# On a cluster, replace the file with whatever knows your machines (a scheduler query, a
# service registry); Horovod only reads this script's output.
set -euo pipefail
file="${HOSTS_FILE:-$(dirname "${BASH_SOURCE[0]}")/hosts.txt}"
if [ ! -f "$file" ]; then
    echo "discover_hosts.sh: no hosts file $file (set HOSTS_FILE to a file of host:slots lines)" >&2
    exit 1
fi
grep -v '^[[:space:]]*\(#\|$\)' "$file" | tr -d '[:blank:]'

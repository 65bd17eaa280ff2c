#!/usr/bin/env bash
# Runs the end-to-end benchmark: installs the Debian packages it needs (as
# root), builds sendguard and the load generator in release mode, and runs
# benches/e2e.py, which prints the table, writes target/e2e/results.json
# and target/e2e/table.md, and draws docs/benchmarks.png.
#
#   benches/e2e.sh [e2e.py options]     for example: --reps 5 --no-rspamd
#
# Every server it starts listens on 127.0.0.1 and is stopped at the end.
# Measure on a quiet machine: the script prints the load average and how
# much CPU other processes used during each run.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

if [[ $(id -u) -ne 0 ]]; then
    echo "e2e.sh: run as root: it installs packages and runs private Postfix instances" >&2
    exit 1
fi

bash "$repo/scripts/install-deps.sh"
# The chart needs Debian's matplotlib, for Debian's /usr/bin/python3.
if ! /usr/bin/python3 -c 'import matplotlib' 2>/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -o DPkg::Lock::Timeout=300 python3-matplotlib
fi

(cd "$repo" && cargo build --release --bin sendguard --example loadgen)

exec /usr/bin/python3 "$repo/benches/e2e.py" "$@"

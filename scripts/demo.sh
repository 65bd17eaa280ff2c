#!/usr/bin/env bash
# Runs sendguard on loopback with a real clamd and an upstream mail sink, so
# mail can be sent to it with swaks.
#
#   scripts/demo.sh          install packages, build, (re)start everything
#   scripts/demo.sh stop     stop the demo's processes
#   scripts/demo.sh status   show which of them run
#
# Processes, configuration and logs live in $SENDGUARD_DEMO_DIR (default
# /tmp/sendguard-demo):
#   clamd      127.0.0.1:3310  test signatures from fixtures/clamd/
#   smtp-sink  127.0.0.1:2526  Postfix's test SMTP server, as the upstream;
#                              it dumps every message it receives into sink/
#   sendguard  127.0.0.1:2525  config derived from config.toml.example
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/lib/services.sh
source "$repo/scripts/lib/services.sh"

demo=${SENDGUARD_DEMO_DIR:-/tmp/sendguard-demo}
clamd_port=3310
sink_port=2526
sendguard_port=2525
admin_port=8025
binary=$repo/target/release/sendguard

usage() {
    echo "usage: $0 [start|stop|status]" >&2
    exit 2
}

stop_demo() {
    stop_pid_file "$demo/sendguard.pid" sendguard
    stop_pid_file "$demo/smtp-sink.pid" smtp-sink
    stop_pid_file "$demo/clamd.pid" clamd
}

show_status() {
    local name pid
    for name in clamd smtp-sink sendguard; do
        if [[ -f $demo/$name.pid ]] && pid=$(cat "$demo/$name.pid") && kill -0 "$pid" 2>/dev/null; then
            echo "$name: running (pid $pid, log $demo/$name.log)"
        else
            echo "$name: not running"
        fi
    done
}

# Sets KEY to VALUE (already in TOML syntax) in table SECTION of FILE. A key
# that is missing is added at the end of the table, and a missing table at
# the end of the file. Commented-out keys are left alone.
set_toml_key() {
    local file=$1 section=$2 key=$3 value=$4
    awk -v section="$section" -v key="$key" -v value="$value" '
        function add_if_missing() {
            if (in_section && !done) { print key " = " value; done = 1 }
        }
        /^[[:space:]]*\[[^\[]/ {
            add_if_missing()
            header = $0
            sub(/^[[:space:]]*\[[[:space:]]*/, "", header)
            sub(/[[:space:]]*\].*$/, "", header)
            in_section = (header == section)
            if (in_section) seen = 1
        }
        in_section && !done && $0 ~ ("^[[:space:]]*" key "[[:space:]]*=") {
            print key " = " value
            done = 1
            next
        }
        { print }
        END {
            add_if_missing()
            if (!seen) { print ""; print "[" section "]"; print key " = " value }
        }
    ' "$file" > "$file.new"
    mv "$file.new" "$file"
}

require_free_port() {
    local port=$1 name=$2
    if port_is_open "$port"; then
        echo "port 127.0.0.1:$port, needed for $name, is taken by another process; stop that process and run $0 again" >&2
        exit 1
    fi
}

# Starts COMMAND in its own session with output to LOG and writes its pid to
# PID_FILE, so it keeps running after this script exits.
start_background() {
    local pid_file=$1 log=$2
    shift 2
    setsid "$@" > "$log" 2>&1 < /dev/null &
    echo $! > "$pid_file"
}

start_demo() {
    section "Stopping a previous demo in $demo"
    stop_demo

    section "Debian packages"
    bash "$repo/scripts/install-deps.sh"

    section "Building sendguard (cargo build --release)"
    (cd "$repo" && cargo build --release)

    require_free_port "$clamd_port" clamd
    require_free_port "$sink_port" smtp-sink
    require_free_port "$sendguard_port" sendguard
    require_free_port "$admin_port" "sendguard's admin API and dashboard"
    mkdir -p "$demo"

    section "clamd on 127.0.0.1:$clamd_port"
    rm -rf "$demo/clamd"
    write_clamd_config "$demo/clamd" "$clamd_port" "$repo/fixtures/clamd"
    start_background "$demo/clamd.pid" "$demo/clamd.log" clamd --config-file="$demo/clamd/clamd.conf"
    wait_for_service 120 "$(cat "$demo/clamd.pid")" "$demo/clamd.log" clamd clamd_replies_to_ping "$clamd_port"
    echo "clamd replied PONG to PING (config $demo/clamd/clamd.conf)"

    section "smtp-sink on 127.0.0.1:$sink_port"
    # smtp-sink refuses to run as root, so it runs as the postfix user, which
    # must be able to write the dump directory.
    install -d -o postfix -g postfix "$demo/sink"
    start_background "$demo/smtp-sink.pid" "$demo/smtp-sink.log" \
        smtp-sink -u postfix -c -h upstream.demo -d "$demo/sink/%Y%m%d-%H%M%S." "127.0.0.1:$sink_port" 1000
    wait_for_service 30 "$(cat "$demo/smtp-sink.pid")" "$demo/smtp-sink.log" smtp-sink smtp_greets "$sink_port"
    echo "smtp-sink greets; received messages are dumped into $demo/sink/"

    section "sendguard on 127.0.0.1:$sendguard_port"
    local example=$repo/config.toml.example config=$demo/sendguard.toml
    if [[ ! -f $example ]]; then
        echo "missing $example, from which the demo configuration is derived" >&2
        exit 1
    fi
    cp "$example" "$config"
    set_toml_key "$config" smtp listen "\"127.0.0.1:$sendguard_port\""
    set_toml_key "$config" upstream address "\"127.0.0.1:$sink_port\""
    set_toml_key "$config" scan.clamd address "\"127.0.0.1:$clamd_port\""
    set_toml_key "$config" store path "\"$demo/sendguard.db\""
    # The admin API and dashboard, with an admin token and a support token
    # made once and kept across runs like the store.
    local token
    for token in admin support; do
        if [[ ! -s $demo/$token.token ]]; then
            (umask 077 && "$binary" token generate > "$demo/$token.token")
        fi
    done
    set_toml_key "$config" admin listen "\"127.0.0.1:$admin_port\""
    set_toml_key "$config" admin token_file "\"$demo/admin.token\""
    set_toml_key "$config" admin support_token_sha256 "\"$("$binary" token hash "$demo/support.token")\""
    # sendguard runs from the repository, so relative paths in the example
    # configuration resolve as they do for a developer.
    (
        cd "$repo"
        export RUST_LOG=${RUST_LOG:-info}
        start_background "$demo/sendguard.pid" "$demo/sendguard.log" "$binary" serve --config "$config"
    )
    wait_for_service 60 "$(cat "$demo/sendguard.pid")" "$demo/sendguard.log" sendguard smtp_greets "$sendguard_port"
    echo "sendguard greets (config $config)"

    section "Ready"
    cat <<EOF
Demo directory: $demo (configs, logs, pid files; smtp-sink's dumps in sink/)

A clean message is relayed upstream (expect 250):
  swaks --server 127.0.0.1:$sendguard_port --from alice@example.org --to bob@example.net

A message carrying the EICAR test string is rejected (expect 550):
EOF
    cat <<'EOF'
  swaks --server 127.0.0.1:2525 --from alice@example.org --to bob@example.net \
    --header 'Subject: EICAR test' \
    --body 'X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*'
EOF
    cat <<EOF

The dashboard is at http://127.0.0.1:$admin_port/ (from another machine:
ssh -L $admin_port:127.0.0.1:$admin_port THIS-HOST). Log in with the token in
$demo/admin.token, or with the one in $demo/support.token to lift a
permanent block.

Logs:   tail -f $demo/sendguard.log
Stop:   ${SENDGUARD_DEMO_DIR:+SENDGUARD_DEMO_DIR=$demo }$0 stop
EOF
}

case ${1:-start} in
    start) start_demo ;;
    stop) stop_demo ;;
    status) show_status ;;
    *) usage ;;
esac

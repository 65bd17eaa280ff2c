# Shell functions shared by .ci/run and scripts/demo.sh to run clamd, rspamd
# and spamd and check loopback services. Source this file from bash; it sets
# no options.

# Prints a section header.
section() {
    printf '\n==== %s ====\n' "$*"
}

# Returns 0 when something accepts TCP connections on 127.0.0.1:PORT.
port_is_open() {
    local port=$1
    timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$port" 2>/dev/null
}

# Prints a port of 127.0.0.1 that nothing listens on right now. Another
# process can still take it before the caller binds it.
pick_free_port() {
    local attempt port
    for attempt in $(seq 1 50); do
        port=$((20000 + RANDOM % 40000))
        if ! port_is_open "$port"; then
            echo "$port"
            return 0
        fi
    done
    echo "pick_free_port: found no free port in 50 attempts" >&2
    return 1
}

# Returns 0 when clamd on 127.0.0.1:PORT replies PONG to PING.
clamd_replies_to_ping() {
    local port=$1 reply
    reply=$(timeout 3 bash -c "exec 3<>/dev/tcp/127.0.0.1/$port && printf 'nPING\n' >&3 && head -c 4 <&3" 2>/dev/null) || return 1
    [[ $reply == PONG ]]
}

# Returns 0 when rspamd's worker on 127.0.0.1:PORT replies to GET /ping.
rspamd_replies_to_ping() {
    local port=$1 reply
    reply=$(timeout 3 bash -c "exec 3<>/dev/tcp/127.0.0.1/$port && printf 'GET /ping HTTP/1.0\r\n\r\n' >&3 && cat <&3" 2>/dev/null) || return 1
    [[ $reply == *pong* ]]
}

# Returns 0 when spamd on 127.0.0.1:PORT replies PONG to PING.
spamd_replies_to_ping() {
    local port=$1 reply
    reply=$(timeout 3 bash -c "exec 3<>/dev/tcp/127.0.0.1/$port && printf 'PING SPAMC/1.5\r\n\r\n' >&3 && cat <&3" 2>/dev/null) || return 1
    [[ $reply == SPAMD/*PONG* ]]
}

# Starts scripts/lib/refuse-dns.pl, a DNS server on 127.0.0.1 that refuses
# every query, in the background with its output in DIRECTORY. Sets
# refuse_dns_pid and refuse_dns_port.
start_refusing_dns() {
    local directory=$1 script
    script="$(dirname "${BASH_SOURCE[0]}")/refuse-dns.pl"
    mkdir -p "$directory"
    perl "$script" > "$directory/dns.port" 2> "$directory/dns.log" < /dev/null &
    refuse_dns_pid=$!
    local waited=0
    while [[ ! -s $directory/dns.port ]] && ((waited < 50)); do
        sleep 0.1
        waited=$((waited + 1))
    done
    refuse_dns_port=$(head -n 1 "$directory/dns.port")
    if [[ ! $refuse_dns_port =~ ^[0-9]+$ ]]; then
        echo "start_refusing_dns: $script printed no port; its log:" >&2
        cat "$directory/dns.log" >&2 || true
        return 1
    fi
}

# Starts Debian's rspamd in the foreground, in the background of this
# shell, with the stock rules, OVERRIDES as its override directory
# (LOCAL_CONFDIR), its worker on 127.0.0.1:PORT, DNS sent to
# 127.0.0.1:DNS_PORT and the compiled Hyperscan databases kept in CACHE.
# Its files and log go to DIRECTORY. Sets rspamd_pid.
start_rspamd() {
    local directory=$1 overrides=$2 port=$3 dns_port=$4 cache=$5
    mkdir -p "$directory/db" "$directory/run" "$directory/log" "$cache"
    local user_options=()
    if [[ $(id -u) -eq 0 ]]; then
        # Otherwise rspamd drops to its own user, which cannot write to
        # directories made by root.
        user_options=(-u root -g root -i)
    fi
    rspamd -f "${user_options[@]}" -c /etc/rspamd/rspamd.conf \
        --var=LOCAL_CONFDIR="$overrides" \
        --var=DBDIR="$directory/db" --var=RUNDIR="$directory/run" --var=LOGDIR="$directory/log" \
        --var=SENDGUARD_HS_CACHE="$cache" \
        --var=SENDGUARD_RSPAMD_PORT="$port" --var=SENDGUARD_DNS_PORT="$dns_port" \
        > "$directory/rspamd.log" 2>&1 < /dev/null &
    rspamd_pid=$!
}

# Starts spamd in the background of this shell: local tests only (no DNS),
# no user configuration, and a private site configuration in DIRECTORY/site
# made of the system's *.pre files and RULES (a local.cf). It listens on
# 127.0.0.1:PORT and on DIRECTORY/spamd.sock. Sets spamd_pid.
start_spamd() {
    local directory=$1 rules=$2 port=$3
    mkdir -p "$directory/site"
    # spamd started by root reads its configuration as "nobody".
    chmod 755 "$directory" "$directory/site"
    cp /etc/spamassassin/*.pre "$directory/site/"
    cp "$rules" "$directory/site/local.cf"
    rm -f "$directory/spamd.sock"
    spamd --local --nouser-config --syslog=stderr --max-children=2 --min-children=1 \
        --siteconfigpath="$directory/site" \
        --listen="127.0.0.1:$port" --listen="$directory/spamd.sock" \
        --pidfile="$directory/spamd.pid" \
        > "$directory/spamd.log" 2>&1 < /dev/null &
    spamd_pid=$!
}

# Returns 0 when the SMTP server on 127.0.0.1:PORT sends a 220 greeting.
smtp_greets() {
    local port=$1 greeting
    greeting=$(timeout 3 bash -c "exec 3<>/dev/tcp/127.0.0.1/$port && head -c 4 <&3" 2>/dev/null) || return 1
    [[ $greeting == "220 " || $greeting == "220-" ]]
}

# Writes DIRECTORY/clamd.conf for a clamd in the foreground on
# 127.0.0.1:PORT, with the signature databases from SIGNATURES copied into
# DIRECTORY/db. clamd runs as the user who starts it, so it can read every
# file that user can.
write_clamd_config() {
    local directory=$1 port=$2 signatures=$3
    mkdir -p "$directory/db" "$directory/tmp"
    local copied=0 file
    for file in "$signatures"/*; do
        [[ -f $file ]] || continue
        # Copy ClamAV database files only, recognised by extension, and leave
        # documentation such as a README behind.
        case ${file##*.} in
            cvd | cld | cud | hdb | hsb | hdu | hsu | mdb | msb | mdu | msu | ndb | ndu | ldb | ldu | idb | cdb | crb | cat | ftm | pdb | gdb | wdb | fp | sfp | ign | ign2 | yar | yara | pwdb | imp) ;;
            *) continue ;;
        esac
        cp "$file" "$directory/db/"
        copied=$((copied + 1))
    done
    if [[ $copied -eq 0 ]]; then
        echo "write_clamd_config: no ClamAV signature database files in $signatures" >&2
        return 1
    fi
    cat > "$directory/clamd.conf" <<EOF
# clamd for sendguard's tests and demo: loopback TCP only, test signatures only.
Foreground yes
TCPSocket $port
TCPAddr 127.0.0.1
DatabaseDirectory $directory/db
TemporaryDirectory $directory/tmp
# clamd closes an INSTREAM session that sends more than StreamMaxLength.
StreamMaxLength 25M
# Files over MaxFileSize, MaxScanSize or MaxRecursion are reported as
# Heuristics.Limits.Exceeded instead of clean (clamd.conf(5), ClamAV 1.4).
AlertExceedsMax yes
LogTime yes
SelfCheck 3600
EOF
}

# Waits up to SECONDS for COMMAND to succeed while process PID runs. On a
# timeout or when the process exits, prints the tail of LOG and returns 1.
wait_for_service() {
    local seconds=$1 pid=$2 log=$3 description=$4
    shift 4
    local deadline=$((SECONDS + seconds))
    while ! "$@"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "$description exited before it was ready; last lines of $log:" >&2
            tail -n 30 "$log" >&2 || true
            return 1
        fi
        if ((SECONDS >= deadline)); then
            echo "$description was not ready after $seconds s; last lines of $log:" >&2
            tail -n 30 "$log" >&2 || true
            return 1
        fi
        sleep 0.2
    done
}

# Stops the process whose id is in PID_FILE if it is still running and its
# command name is NAME, waiting up to 10 s before sending SIGKILL. Removes
# the pid file.
stop_pid_file() {
    local pid_file=$1 name=$2 pid
    [[ -f $pid_file ]] || return 0
    pid=$(cat "$pid_file")
    if [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null && [[ $(ps -o comm= -p "$pid") == "$name" ]]; then
        echo "stopping $name (pid $pid)"
        kill "$pid" 2>/dev/null || true
        local waited=0
        while kill -0 "$pid" 2>/dev/null && ((waited < 50)); do
            sleep 0.2
            waited=$((waited + 1))
        done
        if kill -0 "$pid" 2>/dev/null; then
            echo "$name (pid $pid) did not exit after 10 s; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$pid_file"
}

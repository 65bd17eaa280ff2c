#!/usr/bin/env bash
# Builds the Debian package and checks it in a fresh Debian 12 (bookworm)
# root made with debootstrap. The files must land where the README lists
# them, and the unit must pass `systemd-analyze verify`, be enabled and run
# under systemd. The binary must accept the shipped config, and the service
# user must be able to start the relay and create its store. An upgrade
# must keep an edited config, removing must keep /var/lib/sendguard and
# purging must delete it.
#
# Usage: scripts/test-deb.sh [--fresh] [--keep]
#   --fresh  run debootstrap even when a cached root is at hand
#   --keep   leave the root in target/deb-test/root for inspection
#
# Runs as root on Debian 12 and installs debootstrap, systemd-container
# (systemd-nspawn) and lintian when they are missing.
# The first run downloads a minimal Debian system from the Debian mirror
# (SENDGUARD_DEB_MIRROR, default http://deb.debian.org/debian) and keeps
# the new root as a tar file in target/deb-test/ for later runs. Prints
# PASS or FAIL per check and exits 1 when any check fails.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

mirror=${SENDGUARD_DEB_MIRROR:-http://deb.debian.org/debian}
work="$repo/target/deb-test"
root="$work/root"
# Packages added to debootstrap's minimal set, as on any Debian 12 server.
# systemd brings systemd-analyze and deb-systemd-helper, and man-db the man
# command, which `systemd-analyze verify` runs to check Documentation=.
include=systemd,man-db
cache="$work/bookworm-minbase-${include//,/-}.tar"
fresh=0
keep=0
for argument in "$@"; do
    case $argument in
        --fresh) fresh=1 ;;
        --keep) keep=1 ;;
        *)
            echo "test-deb: invalid argument $argument (expected --fresh or --keep)" >&2
            exit 2
            ;;
    esac
done

if [[ $(id -u) -ne 0 ]]; then
    echo "test-deb: run this script as root, because debootstrap and chroot need root" >&2
    exit 2
fi

started=$SECONDS
passed=0
failed=0
serve_pid=""

pass() {
    echo "PASS: $1"
    passed=$((passed + 1))
}

fail() {
    echo "FAIL: $1" >&2
    failed=$((failed + 1))
}

# Records `check DESCRIPTION COMMAND...` as passed when COMMAND succeeds.
check() {
    local description=$1
    shift
    if "$@"; then
        pass "$description"
    else
        fail "$description"
    fi
}

section() {
    printf '\n== %s (%d s)\n' "$1" "$((SECONDS - started))"
}

in_root() {
    chroot "$root" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8 \
        DEBIAN_FRONTEND=noninteractive "$@"
}

unmount_root() {
    local mount_point
    for mount_point in "$root/proc" "$root/dev/pts" "$root/dev"; do
        if mountpoint -q "$mount_point"; then
            umount -l "$mount_point"
        fi
    done
}

cleanup() {
    if [[ -n $serve_pid ]] && kill -0 "$serve_pid" 2> /dev/null; then
        kill "$serve_pid" 2> /dev/null || true
        wait "$serve_pid" 2> /dev/null || true
    fi
    unmount_root
    if [[ $keep -eq 0 ]]; then
        rm -rf "$root"
    fi
}
trap cleanup EXIT

section "Build the packages"
if ! command -v debootstrap > /dev/null || ! command -v systemd-nspawn > /dev/null \
    || ! command -v lintian > /dev/null; then
    apt-get -o DPkg::Lock::Timeout=300 update || true
    apt-get -o DPkg::Lock::Timeout=300 install -y --no-install-recommends \
        debootstrap systemd-container lintian
fi
# The second package differs only in its revision, as a packaging fix
# would, to test an upgrade over an edited config.
# cargo-deb deletes older builds from its output directory, so each
# package gets a directory of its own.
rm -rf "$work/packages"
package=$(scripts/build-deb.sh --output "$work/packages/1/" | grep '\.deb$')
upgrade=$(cargo deb --no-build --locked --deb-revision 2 --fast --no-dbgsym \
    --output "$work/packages/2/" | grep '\.deb$')
check "package built: $package" test -f "$package"
check "upgrade package built: $upgrade" test -f "$upgrade"
version=$(dpkg-deb --field "$package" Version)
conffiles=$(dpkg-deb --ctrl-tarfile "$package" | tar -xO ./conffiles)
check "/etc/sendguard/config.toml is a conffile" grep -qx /etc/sendguard/config.toml <<< "$conffiles"
check "/etc/sendguard/agent.toml is a conffile" grep -qx /etc/sendguard/agent.toml <<< "$conffiles"
echo "Depends: $(dpkg-deb --field "$package" Depends)"
# initial-upload-closes-no-bugs concerns uploads to Debian's archive only.
lintian_output=$(lintian --fail-on error,warning --suppress-tags initial-upload-closes-no-bugs \
    "$package" 2>&1) && linted=0 || linted=$?
grep -v 'running with root privileges' <<< "$lintian_output" || true
check "lintian finds no error or warning" test "$linted" -eq 0

section "Make a Debian 12 root"
unmount_root
rm -rf "$root"
mkdir -p "$root"
if [[ $fresh -eq 0 && -f $cache ]]; then
    tar -xf "$cache" -C "$root"
    echo "unpacked the cached root $cache (delete it or pass --fresh for a new one)"
else
    debootstrap --variant=minbase --include="$include" bookworm "$root" "$mirror" \
        > "$work/debootstrap.log" 2>&1 || {
        tail -n 20 "$work/debootstrap.log" >&2
        fail "debootstrap bookworm from $mirror (log: $work/debootstrap.log)"
        exit 1
    }
    tar -cf "$cache" -C "$root" .
    echo "made a new root with debootstrap from $mirror and cached it as $cache"
fi
mount -t proc proc "$root/proc"
# Package installs in the root start no services.
printf '#!/bin/sh\nexit 101\n' > "$root/usr/sbin/policy-rc.d"
chmod 755 "$root/usr/sbin/policy-rc.d"
check "root is Debian 12" grep -q '^VERSION_ID="12"' "$root/etc/os-release"

section "Install the package"
cp "$package" "$upgrade" "$root/tmp/"
in_root apt-get -o DPkg::Lock::Timeout=300 update > "$work/apt.log" 2>&1 || true
if in_root apt-get install -y --no-install-recommends "/tmp/$(basename "$package")" \
    >> "$work/apt.log" 2>&1; then
    pass "apt-get install ./$(basename "$package") with its dependencies"
else
    tail -n 30 "$work/apt.log" >&2
    fail "apt-get install ./$(basename "$package") (log: $work/apt.log)"
    exit 1
fi
installed=$(in_root dpkg-query -W -f='${Version} ${Status}' sendguard)
check "dpkg reports $version installed" test "$installed" = "$version install ok installed"

section "Files land where the README says"
for path in \
    /usr/bin/sendguard \
    /etc/sendguard/config.toml \
    /usr/lib/systemd/system/sendguard.service \
    /etc/sendguard/agent.toml \
    /usr/lib/systemd/system/sendguard-agent.service \
    /usr/share/doc/sendguard/agent.toml.example \
    /usr/share/man/man8/sendguard-agent.8.gz \
    /usr/share/man/man8/sendguard.8.gz \
    /usr/share/man/man8/sendguard-serve.8.gz \
    /usr/share/man/man8/sendguard-config-check.8.gz \
    /usr/share/bash-completion/completions/sendguard \
    /usr/share/zsh/vendor-completions/_sendguard \
    /usr/share/fish/vendor_completions.d/sendguard.fish \
    /usr/share/doc/sendguard/config.toml.example \
    /usr/share/doc/sendguard/README.md \
    /usr/share/doc/sendguard/copyright \
    /usr/share/doc/sendguard/changelog.Debian.gz; do
    check "$path installed" test -f "$root$path"
done
check "config is config.toml.example" cmp -s config.toml.example "$root/etc/sendguard/config.toml"
check "agent config is agent.toml.example" cmp -s agent.toml.example "$root/etc/sendguard/agent.toml"
man_page=$(MANWIDTH=80 man -l "$root/usr/share/man/man8/sendguard.8.gz" 2> /dev/null || true)
check "man page renders and lists sendguard-serve(8)" grep -q 'sendguard-serve(8)' <<< "$man_page"
check "man page names /etc/sendguard/config.toml" grep -q '/etc/sendguard/config.toml' <<< "$man_page"

section "Service user, state directory and unit"
account=$(in_root getent passwd sendguard || true)
check "system user sendguard exists: $account" test -n "$account"
uid=$(cut -d: -f3 <<< "$account")
check "sendguard is a system user (uid ${uid:-none} below 1000)" test "${uid:-1000}" -lt 1000
check "sendguard cannot log in" grep -q ':/usr/sbin/nologin$' <<< "$account"
state=$(in_root stat -c '%U:%G %a' /var/lib/sendguard 2> /dev/null || true)
check "/var/lib/sendguard is sendguard:sendguard 750 (is ${state:-missing})" test "$state" = "sendguard:sendguard 750"
check "sendguard.service is enabled for multi-user.target" \
    test -L "$root/etc/systemd/system/multi-user.target.wants/sendguard.service"
# The agent's unit needs its config edited first, so it is installed
# disabled and not started.
check "sendguard-agent.service is not enabled" \
    test ! -e "$root/etc/systemd/system/multi-user.target.wants/sendguard-agent.service"
agent_verify=$(in_root systemd-analyze verify /usr/lib/systemd/system/sendguard-agent.service 2>&1) \
    && agent_verified=0 || agent_verified=$?
[[ -n $agent_verify ]] && echo "$agent_verify"
check "systemd-analyze verify sendguard-agent.service" test "$agent_verified" -eq 0
verify=$(in_root systemd-analyze verify /usr/lib/systemd/system/sendguard.service 2>&1) \
    && verified=0 || verified=$?
[[ -n $verify ]] && echo "$verify"
check "systemd-analyze verify sendguard.service" test "$verified" -eq 0
check "systemd-analyze verify printed nothing about sendguard.service" \
    test -z "$(grep -i sendguard <<< "$verify" || true)"
unit=$(in_root systemctl cat sendguard.service 2> /dev/null || cat "$root/usr/lib/systemd/system/sendguard.service")
for setting in 'User=sendguard' 'ProtectSystem=strict' 'StateDirectory=sendguard' \
    'ExecReload=/bin/kill -HUP $MAINPID' 'NoNewPrivileges=yes' 'CapabilityBoundingSet='; do
    check "unit sets $setting" grep -qxF "$setting" <<< "$unit"
done

section "The binary runs in the root"
printed=$(in_root sendguard --version 2>&1 || true)
check "sendguard --version prints ${version%-*} (printed: $printed)" test "$printed" = "sendguard ${version%-*}"
printed=$(in_root sendguard config check /etc/sendguard/config.toml 2>&1) && status=0 || status=$?
echo "$printed"
check "sendguard config check /etc/sendguard/config.toml as root" test "$status" -eq 0
printed=$(in_root setpriv --reuid=sendguard --regid=sendguard --init-groups \
    sendguard config check /etc/sendguard/config.toml 2>&1) && status=0 || status=$?
check "sendguard config check as the sendguard user" test "$status" -eq 0

# The relay starts as the service user with the shipped config, moved to a
# free loopback port so that it cannot clash with another relay on this
# machine, and creates its store in /var/lib/sendguard.
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
sed "s/^listen = \"127.0.0.1:2525\"/listen = \"127.0.0.1:$port\"/" \
    "$root/etc/sendguard/config.toml" > "$root/tmp/serve.toml"
chmod 644 "$root/tmp/serve.toml"
# chroot, env and setpriv each exec the next program, so $! is the
# relay's own process id.
chroot "$root" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8 \
    setpriv --reuid=sendguard --regid=sendguard --init-groups \
    sendguard serve --config /tmp/serve.toml > "$work/serve.log" 2>&1 &
serve_pid=$!
greeting=""
for _ in $(seq 50); do
    if greeting=$(timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$port && head -n 1 <&3" 2> /dev/null); then
        break
    fi
    sleep 0.2
done
check "relay as the sendguard user greets on 127.0.0.1:$port (greeting: ${greeting%$'\r'})" \
    grep -q '^220 ' <<< "$greeting"
store=$(in_root stat -c '%U:%G' /var/lib/sendguard/sendguard.db 2> /dev/null || true)
check "store /var/lib/sendguard/sendguard.db created by sendguard (owner: ${store:-missing})" \
    test "$store" = "sendguard:sendguard"
kill -HUP "$serve_pid" 2> /dev/null || true
for _ in $(seq 25); do
    grep -q 'configuration reloaded' "$work/serve.log" && break
    sleep 0.2
done
check "relay logged 'configuration reloaded' after SIGHUP" grep -q 'configuration reloaded' "$work/serve.log"
check "relay still runs after SIGHUP" kill -0 "$serve_pid"
kill -TERM "$serve_pid" 2> /dev/null || true
wait "$serve_pid" && status=0 || status=$?
serve_pid=""
check "relay stops with status 0 on SIGTERM (status $status)" test "$status" -eq 0
check "relay logged no error" test -z "$(grep -E 'ERROR|^sendguard: ' "$work/serve.log" || true)"
echo "relay log:"
sed 's/^/  /' "$work/serve.log"

section "The unit runs under systemd"
# systemd boots the root as a container with a network namespace of its
# own, so the relay's port 2525 cannot clash with the host's. A oneshot
# unit reloads and probes sendguard.service, writes what it found to
# /var/log/sendguard-test.log and powers the container off.
cat > "$root/etc/systemd/system/sendguard-test.service" << 'UNIT'
[Unit]
Description=Probe sendguard.service for test-deb.sh
After=sendguard.service

[Service]
Type=oneshot
StandardOutput=append:/var/log/sendguard-test.log
StandardError=append:/var/log/sendguard-test.log
ExecStart=/bin/bash -c '\
    sleep 2; \
    echo "state=$(systemctl is-active sendguard)"; \
    systemctl show -p User -p NRestarts sendguard; \
    exec 3<>/dev/tcp/127.0.0.1/2525 && echo "greeting=$(head -n 1 <&3)"; \
    systemctl reload sendguard && echo reload=ok; \
    sleep 1; \
    echo "state-after-reload=$(systemctl is-active sendguard)"; \
    journalctl -u sendguard -o cat --no-pager; \
    systemd-analyze security --no-pager sendguard.service | tail -n 1'
ExecStopPost=/bin/systemctl poweroff

[Install]
WantedBy=multi-user.target
UNIT
ln -sf /etc/systemd/system/sendguard-test.service \
    "$root/etc/systemd/system/multi-user.target.wants/sendguard-test.service"
rm -f "$root/var/log/sendguard-test.log"
unmount_root
# --register=no and --keep-unit let systemd-nspawn run on a host whose own
# init is not systemd.
timeout --kill-after=10 180 systemd-nspawn --quiet --directory="$root" --boot \
    --private-network --register=no --keep-unit --console=pipe \
    > "$work/nspawn.log" 2>&1 < /dev/null || true
mount -t proc proc "$root/proc"
rm "$root/etc/systemd/system/sendguard-test.service" \
    "$root/etc/systemd/system/multi-user.target.wants/sendguard-test.service"
probe=$(cat "$root/var/log/sendguard-test.log" 2> /dev/null || true)
echo "$probe" > "$work/systemd-probe.log"
if [[ -z $probe ]]; then
    echo "systemd-nspawn output:" >&2
    tail -n 20 "$work/nspawn.log" >&2
fi
check "sendguard.service is active after boot" grep -qx 'state=active' <<< "$probe"
check "sendguard.service runs as User=sendguard" grep -qx 'User=sendguard' <<< "$probe"
check "sendguard.service did not restart" grep -qx 'NRestarts=0' <<< "$probe"
check "relay greets on 127.0.0.1:2525 under systemd" grep -q '^greeting=220 ' <<< "$probe"
check "systemctl reload sendguard succeeds" grep -qx 'reload=ok' <<< "$probe"
check "sendguard logged 'configuration reloaded'" grep -q 'configuration reloaded' <<< "$probe"
check "sendguard.service is active after the reload" grep -qx 'state-after-reload=active' <<< "$probe"
grep 'exposure level' <<< "$probe" || true
echo "the probe's full output is in $work/systemd-probe.log"

section "Upgrade keeps the edited config"
echo '# Edited by test-deb.sh.' >> "$root/etc/sendguard/config.toml"
if in_root dpkg -i "/tmp/$(basename "$upgrade")" >> "$work/apt.log" 2>&1; then
    pass "dpkg -i $(basename "$upgrade")"
else
    fail "dpkg -i $(basename "$upgrade") (log: $work/apt.log)"
fi
upgraded=$(in_root dpkg-query -W -f='${Version}' sendguard)
check "version is ${version%-*}-2 (is $upgraded)" test "$upgraded" = "${version%-*}-2"
check "edited config kept" grep -qx '# Edited by test-deb.sh.' "$root/etc/sendguard/config.toml"
check "no config.toml.dpkg-new or .dpkg-dist left" \
    test -z "$(ls "$root/etc/sendguard" | grep dpkg || true)"
in_root dpkg -i "/tmp/$(basename "$upgrade")" >> "$work/apt.log" 2>&1 || true
check "reinstalling the same package keeps the edited config" \
    grep -qx '# Edited by test-deb.sh.' "$root/etc/sendguard/config.toml"
check "store kept over the upgrade" test -f "$root/var/lib/sendguard/sendguard.db"

section "Remove keeps the state, purge deletes it"
check "dpkg --remove sendguard" in_root dpkg --remove sendguard
check "/usr/bin/sendguard removed" test ! -e "$root/usr/bin/sendguard"
check "/var/lib/sendguard kept with the store" test -f "$root/var/lib/sendguard/sendguard.db"
check "edited /etc/sendguard/config.toml kept" grep -qx '# Edited by test-deb.sh.' "$root/etc/sendguard/config.toml"
check "dpkg --purge sendguard" in_root dpkg --purge sendguard
check "/var/lib/sendguard deleted" test ! -e "$root/var/lib/sendguard"
check "/etc/sendguard/config.toml deleted" test ! -e "$root/etc/sendguard/config.toml"
check "sendguard.service no longer enabled" \
    test ! -e "$root/etc/systemd/system/multi-user.target.wants/sendguard.service"

section "Result"
echo "$passed passed, $failed failed"
echo "test-deb took $((SECONDS - started)) s"
if [[ $failed -ne 0 ]]; then
    exit 1
fi

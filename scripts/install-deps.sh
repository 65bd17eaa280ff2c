#!/usr/bin/env bash
# Installs the Debian packages that the tests and the demo need:
# - clamd for virus scanning, rspamd and SpamAssassin's spamd as spam engines;
# - Postfix for smtp-source and smtp-sink and as the MTA in front of the
#   milter, swaks, and sasl2-bin for the milter tests' SASL users;
# - redis-server and redis-cli for the shared-store tests, which start their
#   own servers, and libfaketime, which gives one of them a slow clock;
# - nftables, whose nft the agents of the agent tests run in their own
#   network namespaces;
# - chromium and nodejs for the dashboard's browser tests.
# The browser tests drive Chromium with the npm package playwright-core,
# which downloads no browser. This script installs it into
# tests/dashboard/node_modules with `npm ci` from the committed
# package-lock.json. It adds Debian's npm package when the installed nodejs
# has no npm of its own.
#
# Idempotent: when every package is installed already it only checks and
# exits. It never starts the system's clamav, rspamd, spamd or postfix
# services, because /usr/sbin/policy-rc.d (exit 101) makes package scripts
# skip service starts.
# Needs root when something is missing.
set -euo pipefail

packages=(clamav clamav-daemon clamdscan rspamd spamassassin spamd postfix swaks sasl2-bin redis-server redis-tools libfaketime chromium nodejs nftables)

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# Installs the dashboard tests' npm packages when they are missing.
install_npm_packages() {
    local driver="$repo/tests/dashboard"
    if [[ -d "$driver/node_modules/playwright-core" ]]; then
        echo "install-deps: npm packages of tests/dashboard are installed"
        return
    fi
    if ! command -v npm > /dev/null; then
        echo "install-deps: npm is missing; installing Debian's npm package"
        apt-get -o DPkg::Lock::Timeout=300 install -y npm
    fi
    echo "install-deps: installing the npm packages of tests/dashboard (npm ci)"
    (cd "$driver" && npm ci --no-audit --no-fund)
}

missing=()
for package in "${packages[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$package" 2>/dev/null || true)
    if [[ "$status" != "install ok installed" ]]; then
        missing+=("$package")
    fi
done

if [[ ${#missing[@]} -eq 0 ]]; then
    echo "install-deps: all packages are installed: ${packages[*]}"
    install_npm_packages
    exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
    echo "install-deps: missing packages: ${missing[*]}. Run this script as root to install them." >&2
    exit 1
fi

echo "install-deps: installing ${missing[*]}"

if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\n# Keep package installs from starting services.\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    echo "install-deps: created /usr/sbin/policy-rc.d so that package installs start no services"
fi

# The postfix package prompts for a mail server configuration on install,
# and "No configuration" installs only the programs.
echo 'postfix postfix/main_mailer_type select No configuration' | debconf-set-selections

export DEBIAN_FRONTEND=noninteractive
apt_options=(-o DPkg::Lock::Timeout=300 -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
# A failing third-party source makes apt-get update exit non-zero even when
# Debian's lists were fetched, so the install below decides.
if ! apt-get "${apt_options[@]}" update; then
    echo "install-deps: apt-get update failed; trying the install with the package lists at hand" >&2
fi
apt-get "${apt_options[@]}" install -y "${missing[@]}"
install_npm_packages

echo "install-deps: done"

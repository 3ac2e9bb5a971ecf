#!/usr/bin/env bash
# The project's test command (the README's, and CI's through .ci/run).
#
# 1. Installs what the tests need and nothing else (idempotent: skips apt when all is there):
#    Debian packages prosody, prometheus, prometheus-alertmanager, chromium, installed under a
#    temporary /usr/sbin/policy-rc.d that refuses service starts, so no system daemon runs;
#    the PyPI package kubernetes-validate.
# 2. Runs the check steps in order and keeps going after a failed step, then prints
#    `steps: N passed, N failed` and exits non-zero if any step failed.
#
# Usage: scripts/test.sh [STEP...]   every step by default, or only the named ones
#        scripts/test.sh --list       list the steps
#        scripts/test.sh --setup      install and check the tools, run no step
#
# Adding a step: write a function `step_NAME` below and add NAME to STEPS, or drop an
# executable-or-not `scripts/checks.d/NN-name.sh` (run with bash from the repo root, after the
# built-in steps, in name order). A step fails by exiting non-zero; `set -euo pipefail` is on
# inside every step. A step never skips silently: a missing tool is a failure.
#
# Environment exported for the tests (they also find the binaries on PATH by themselves):
# PROSODY_BIN, PROSODYCTL_BIN, PROMETHEUS_BIN, PROMTOOL_BIN, AMTOOL_BIN, ALERTMANAGER_BIN,
# CHROMIUM_BIN.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO_ROOT="$(pwd)"
export REPO_ROOT

APT_PACKAGES=(prosody prometheus prometheus-alertmanager chromium)
PIP_PACKAGES=(kubernetes-validate)
# Tools that must exist once the install is done (checked loudly).
REQUIRED_TOOLS=(cargo rustfmt prosody prosodyctl prometheus promtool prometheus-alertmanager amtool chromium
    kubernetes-validate node npm python3)

# The built-in steps, in order. Each NAME runs the function step_NAME.
STEPS=(fmt clippy test deploy fuzz)

log() { printf '\n==> %s\n' "$*" >&2; }
die() {
    printf 'scripts/test.sh: error: %s\n' "$*" >&2
    exit 1
}

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root (or sudo) to run: $*"
    fi
}

# ---------------------------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------------------------

POLICY_RC=/usr/sbin/policy-rc.d
POLICY_RC_BACKUP=""
POLICY_RC_INSTALLED=0

restore_policy_rc() {
    if [ "$POLICY_RC_INSTALLED" -eq 1 ]; then
        if [ -n "$POLICY_RC_BACKUP" ]; then
            as_root mv -f "$POLICY_RC_BACKUP" "$POLICY_RC"
        else
            as_root rm -f "$POLICY_RC"
        fi
        POLICY_RC_INSTALLED=0
    fi
}

deny_service_starts() {
    if [ -e "$POLICY_RC" ]; then
        POLICY_RC_BACKUP="$(as_root mktemp "${POLICY_RC}.test-sh.XXXXXX")"
        as_root cp -p "$POLICY_RC" "$POLICY_RC_BACKUP"
    fi
    trap restore_policy_rc EXIT
    trap 'restore_policy_rc; exit 130' INT TERM
    POLICY_RC_INSTALLED=1
    printf '#!/bin/sh\n# Written by scripts/test.sh while it installs packages: start no service.\nexit 101\n' |
        as_root tee "$POLICY_RC" >/dev/null
    as_root chmod 755 "$POLICY_RC"
}

apt_missing() {
    local pkg
    for pkg in "${APT_PACKAGES[@]}"; do
        if ! dpkg-query -W -f='${Status}\n' "$pkg" 2>/dev/null | grep -q '^install ok installed$'; then
            printf '%s\n' "$pkg"
        fi
    done
}

install_apt_packages() {
    local missing
    mapfile -t missing < <(apt_missing)
    if [ "${#missing[@]}" -eq 0 ]; then
        log "Debian packages already installed: ${APT_PACKAGES[*]}"
        return 0
    fi
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found; install by hand: ${missing[*]}"
    log "Installing Debian packages: ${missing[*]}"
    local start=$SECONDS
    deny_service_starts
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -o DPkg::Lock::Timeout=600
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -o DPkg::Lock::Timeout=600 --no-install-recommends "${missing[@]}"
    restore_policy_rc
    trap - EXIT INT TERM
    log "Debian packages installed in $((SECONDS - start)) s"
}

install_pip_packages() {
    local pkg missing=()
    for pkg in "${PIP_PACKAGES[@]}"; do
        python3 -m pip show --quiet "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    if [ "${#missing[@]}" -eq 0 ]; then
        log "Python packages already installed: ${PIP_PACKAGES[*]}"
        return 0
    fi
    log "Installing Python packages: ${missing[*]}"
    python3 -m pip install --quiet --disable-pip-version-check "${missing[@]}"
    # pyenv puts console scripts behind shims that exist only after a rehash.
    if command -v pyenv >/dev/null 2>&1; then pyenv rehash || true; fi
}

check_tools() {
    local tool missing=()
    for tool in "${REQUIRED_TOOLS[@]}"; do
        command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
    done
    cargo clippy --version >/dev/null 2>&1 || missing+=("cargo-clippy")
    [ "${#missing[@]}" -eq 0 ] || die "missing after install: ${missing[*]}"
}

export_tool_paths() {
    PROSODY_BIN="$(command -v prosody)"
    PROSODYCTL_BIN="$(command -v prosodyctl)"
    PROMETHEUS_BIN="$(command -v prometheus)"
    PROMTOOL_BIN="$(command -v promtool)"
    AMTOOL_BIN="$(command -v amtool)"
    ALERTMANAGER_BIN="$(command -v prometheus-alertmanager)"
    CHROMIUM_BIN="$(command -v chromium)"
    export PROSODY_BIN PROSODYCTL_BIN PROMETHEUS_BIN PROMTOOL_BIN AMTOOL_BIN ALERTMANAGER_BIN \
        CHROMIUM_BIN
}

setup() {
    install_apt_packages
    install_pip_packages
    check_tools
    export_tool_paths
}

# ---------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------

step_fmt() {
    cargo fmt --all -- --check
}

step_clippy() {
    cargo clippy --workspace --all-targets -- -D warnings
}

step_test() {
    cargo test --workspace
}

# Kubernetes manifests, generated PrometheusRule/ConfigMaps in step with alerts/ and dashboards/,
# and the manifests' flags checked against the binary the test step just built.
# The stanza fuzz target for a bounded time (FUZZ_SECONDS, 30 by default); any crash fails.
step_fuzz() {
    bash scripts/fuzz.sh "${FUZZ_SECONDS:-30}"
}

step_deploy() {
    # The binary the test step built (a no-op then; `cargo build` would rebuild the tree
    # without the dev-dependencies' features).
    cargo test --workspace --no-run --quiet
    ONSIP_UA_EXPORTER_BIN="$REPO_ROOT/target/debug/onsip-ua-exporter" bash deploy/check.sh
}

# ---------------------------------------------------------------------------------------------
# Runner
# ---------------------------------------------------------------------------------------------

# Step names: the built-in ones, then one per scripts/checks.d/*.sh (name: file name less .sh).
all_steps() {
    printf '%s\n' "${STEPS[@]}"
    local f
    for f in scripts/checks.d/*.sh; do
        [ -e "$f" ] || continue
        f="${f##*/}"
        printf '%s\n' "${f%.sh}"
    done
}

run_step() {
    local name="$1"
    if declare -F "step_$name" >/dev/null; then
        "step_$name"
    elif [ -f "scripts/checks.d/$name.sh" ]; then
        bash -euo pipefail "scripts/checks.d/$name.sh"
    else
        die "no such step: $name (known: $(all_steps | tr '\n' ' '))"
    fi
}

main() {
    local selected=() name
    case "${1:-}" in
    --list)
        all_steps
        return 0
        ;;
    --setup)
        setup
        return 0
        ;;
    -*) die "unknown option: $1" ;;
    esac
    if [ "$#" -gt 0 ]; then
        selected=("$@")
        for name in "${selected[@]}"; do
            all_steps | grep -qxF -- "$name" || die "no such step: $name (known: $(all_steps | tr '\n' ' '))"
        done
    else
        mapfile -t selected < <(all_steps)
    fi

    setup

    local rc start passed=0 failed=0 failed_names=()
    for name in "${selected[@]}"; do
        log "step $name"
        start=$SECONDS
        # A subshell with errexit on and not in an `if`/`||` context (where bash would ignore
        # errexit inside the function): a failing command ends the step, not the script.
        set +e
        (
            set -euo pipefail
            run_step "$name"
        )
        rc=$?
        set -e
        if [ "$rc" -eq 0 ]; then
            passed=$((passed + 1))
            log "step $name passed ($((SECONDS - start)) s)"
        else
            failed=$((failed + 1))
            failed_names+=("$name")
            log "step $name FAILED with exit code $rc ($((SECONDS - start)) s)"
        fi
    done

    if [ "$failed" -gt 0 ]; then
        printf '\nfailed steps: %s\n' "${failed_names[*]}"
    fi
    printf '\nsteps: %d passed, %d failed\n' "$passed" "$failed"
    [ "$failed" -eq 0 ]
}

main "$@"

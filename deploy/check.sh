#!/usr/bin/env bash
# Offline checks of everything in deploy/: the one entry point the test suite calls.
#
#   generate       deploy/generate.py --check: generated/ equals what alerts/ and dashboards/ give
#   k8s-schema     kubernetes-validate --strict (unknown fields are errors) on every plain
#                  manifest, against Kubernetes 1.29 (first with native sidecars on by
#                  default) and 1.37; any kind it has no schema for, bar monitoring.coreos.com, fails
#   crd-schema     PodMonitor, ServiceMonitor, PrometheusRule against the prometheus-operator
#                  schemas (@kubernetes-models/prometheus-operator), unknown fields included
#   promtool       the PrometheusRule's spec.groups through `promtool check rules`
#   policy         hardening and cross-references (deploy/check/policy.py); with
#                  ONSIP_UA_EXPORTER_BIN=path/to/a/fresh/onsip-ua-exporter also the manifests'
#                  flags and env against its --help and `check-config` (else it says NOT checked)
#   dockerfile     deploy/Dockerfile through dockerfile-utils' linter (no image is built)
#
# Installs what is missing and can be installed here: the PyPI packages PyYAML and
# kubernetes-validate, and the npm packages of deploy/check/package-lock.json (`npm ci`
# into deploy/check/node_modules). python3, node, npm and promtool (Debian's `prometheus`
# package, installed by scripts/test.sh) must be there: a missing one is a failure.
# Every step runs; the script exits 1 if any failed and never skips one.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
DEPLOY=deploy
CHECK_DIR="$DEPLOY/check"
K8S_VERSIONS=(1.29.0 1.37.0)
KUBERNETES_VALIDATE_PIP="kubernetes-validate==1.37.0"

log() { printf '\n==> %s\n' "$*" >&2; }
die() {
    printf 'deploy/check.sh: error: %s\n' "$*" >&2
    exit 1
}

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

# --- setup ------------------------------------------------------------------------------------
setup() {
    local missing=() tool
    for tool in python3 node npm promtool; do
        command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
    done
    [ "${#missing[@]}" -eq 0 ] ||
        die "missing: ${missing[*]} (promtool: apt-get install --no-install-recommends prometheus)"

    local pip=()
    python3 -c 'import yaml' 2>/dev/null || pip+=(pyyaml)
    python3 -m kubernetes_validate --version >/dev/null 2>&1 || pip+=("$KUBERNETES_VALIDATE_PIP")
    if [ "${#pip[@]}" -gt 0 ]; then
        log "installing Python packages: ${pip[*]}"
        python3 -m pip install --quiet --disable-pip-version-check "${pip[@]}"
        if command -v pyenv >/dev/null 2>&1; then pyenv rehash || true; fi
    fi
    python3 -m kubernetes_validate --version >/dev/null 2>&1 || die "kubernetes-validate unusable"

    # npm ci when node_modules does not come from the committed lock file (stamped by hash).
    local want have=""
    want="$(sha256sum "$CHECK_DIR/package-lock.json" | cut -d' ' -f1)"
    [ -f "$CHECK_DIR/node_modules/.lock-sha256" ] && have="$(cat "$CHECK_DIR/node_modules/.lock-sha256")"
    if [ "$want" != "$have" ]; then
        log "installing npm packages into $CHECK_DIR/node_modules (npm ci)"
        (cd "$CHECK_DIR" && npm ci --loglevel=error --no-audit --no-fund)
        printf '%s\n' "$want" >"$CHECK_DIR/node_modules/.lock-sha256"
    fi
}

# Plain manifests: every YAML file in deploy/ and deploy/generated/ but kustomization.yaml.
manifests() {
    local f
    for f in "$DEPLOY"/*.yaml "$DEPLOY"/generated/*.yaml; do
        [ -e "$f" ] || continue
        [ "${f##*/}" = kustomization.yaml ] && continue
        printf '%s\n' "$f"
    done
}

# --- steps ------------------------------------------------------------------------------------
step_generate() {
    python3 "$DEPLOY/generate.py" --check
}

step_k8s-schema() {
    local files version out expected passed bad
    mapfile -t files < <(manifests)
    [ "${#files[@]}" -gt 0 ] || die "no manifest found"
    # Documents kubernetes-validate must pass: all but the prometheus-operator kinds.
    expected="$(python3 - "${files[@]}" <<'EOF'
import sys, yaml
n = 0
for f in sys.argv[1:]:
    for d in yaml.safe_load_all(open(f, encoding="utf-8")):
        if d and not str(d.get("apiVersion", "")).startswith("monitoring.coreos.com/"):
            n += 1
print(n)
EOF
)"
    for version in "${K8S_VERSIONS[@]}"; do
        out="$TMP/kv-$version.txt"
        if ! python3 -m kubernetes_validate --strict --kubernetes-version "$version" "${files[@]}" >"$out" 2>&1; then
            cat "$out"
            echo "kubernetes-validate $version: failed" >&2
            return 1
        fi
        # It only warns (exit 0) for a kind it has no schema for: fail on any that is not a
        # prometheus-operator kind (checked by crd-schema), so no object goes unchecked.
        bad="$(grep -v '^INFO .* passed for resource ' "$out" |
            grep -v "^WARN .*Couldn't find schema for kind [A-Za-z]* with api version monitoring\.coreos\.com/" || true)"
        if [ -n "$bad" ]; then
            cat "$out"
            echo "kubernetes-validate $version: unexpected output (above)" >&2
            return 1
        fi
        passed="$(grep -c '^INFO .* passed for resource ' "$out" || true)"
        if [ "$passed" -ne "$expected" ]; then
            cat "$out"
            echo "kubernetes-validate $version: $passed objects passed, expected $expected" >&2
            return 1
        fi
        echo "kubernetes-validate --strict -k $version: $passed objects in ${#files[@]} files passed"
    done
}

step_crd-schema() {
    local files
    mapfile -t files < <(manifests)
    node "$CHECK_DIR/validate-crds.mjs" "${files[@]}"
}

step_promtool() {
    local files groups
    [ -f "$DEPLOY/generated/prometheusrule.yaml" ] || die "generated/prometheusrule.yaml missing"
    mapfile -t files < <(manifests)
    # Each PrometheusRule's spec.groups, written as the rule file Prometheus would load.
    mapfile -t groups < <(python3 - "$TMP" "${files[@]}" <<'EOF'
import sys, yaml
from pathlib import Path
out_dir, n = Path(sys.argv[1]), 0
for f in sys.argv[2:]:
    for d in yaml.safe_load_all(open(f, encoding="utf-8")):
        if d and d.get("kind") == "PrometheusRule":
            n += 1
            out = out_dir / f"{Path(f).stem}.{d['metadata']['name']}.rules.yml"
            with open(out, "w", encoding="utf-8") as fh:
                yaml.safe_dump({"groups": d["spec"]["groups"]}, fh, sort_keys=False)
            print(out)
if n == 0:
    sys.exit("no PrometheusRule found")
EOF
)
    [ "${#groups[@]}" -gt 0 ] || return 1
    promtool check rules "${groups[@]}"
}

step_policy() {
    python3 "$CHECK_DIR/policy.py"
}

step_dockerfile() {
    local out
    out="$("$CHECK_DIR/node_modules/.bin/dockerfile-utils" lint "$DEPLOY/Dockerfile" 2>&1)" || {
        printf '%s\n' "$out"
        return 1
    }
    # It exits 0 on warnings: treat any diagnostic as a failure.
    if [ -n "$out" ]; then
        printf '%s\n' "$out"
        return 1
    fi
    echo "deploy/Dockerfile: no lint diagnostics"
}

# --- runner -----------------------------------------------------------------------------------
STEPS=(generate k8s-schema crd-schema promtool policy dockerfile)

main() {
    local start=$SECONDS
    setup
    local name rc t passed=0 failed=0 failed_names=()
    for name in "${STEPS[@]}"; do
        log "deploy check: $name"
        t=$SECONDS
        set +e
        (
            set -euo pipefail
            "step_$name"
        )
        rc=$?
        set -e
        if [ "$rc" -eq 0 ]; then
            passed=$((passed + 1))
            log "deploy check: $name passed ($((SECONDS - t)) s)"
        else
            failed=$((failed + 1))
            failed_names+=("$name")
            log "deploy check: $name FAILED with exit code $rc ($((SECONDS - t)) s)"
        fi
    done
    [ "$failed" -eq 0 ] || printf '\nfailed deploy checks: %s\n' "${failed_names[*]}"
    printf '\nall deploy checks took %d s\ndeploy: %d passed, %d failed\n' "$((SECONDS - start))" "$passed" "$failed"
    [ "$failed" -eq 0 ]
}

main "$@"

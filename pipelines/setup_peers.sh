#!/usr/bin/env bash
# Install the real consumers some tests check our outputs against, each where it belongs:
#   - SAELens (sae-lens, pinned in pipelines/requirements-saelens.txt) in its own venv
#     ($SAEFORGE_SAELENS_VENV, default /opt/saelens-venv): export round trips, compare_saelens.
#   - circuit-tracer 0.5 (pinned in pipelines/requirements-circuit-tracer.txt; it needs
#     transformers <= 4.57.3) in its own venv ($SAEFORGE_CIRCUIT_TRACER_VENV, default
#     /opt/circuit-tracer-venv): transcoder / CLT export round trips.
#   - Debian's chromium and chromedriver: the feature browser's headless-browser test.
# Each step is independent and tolerant: a peer that fails to install is reported here and its
# tests skip with the reason. CPU torch goes first into each venv (a free choice pulls CUDA).
#   bash pipelines/setup_peers.sh            # all three
#   bash pipelines/setup_peers.sh saelens    # or any of: saelens circuit-tracer browser
set -uo pipefail
cd "$(dirname "$0")/.."
want=${*:-saelens circuit-tracer browser}
export PIP_DISABLE_PIP_VERSION_CHECK=1

venv() {  # venv DIR REQUIREMENTS-FILE MODULE
    local dir=$1 req=$2 mod=$3
    if "$dir/bin/python" -c "import $mod" 2>/dev/null; then echo "setup_peers: $mod already in $dir"; return 0; fi
    python3 -m venv "$dir" && "$dir/bin/pip" install -q torch==2.13.0 && "$dir/bin/pip" install -q -r "$req" \
        && "$dir/bin/python" -c "import $mod" \
        && echo "setup_peers: $mod installed in $dir" \
        || echo "setup_peers: WARNING: $mod could not be installed in $dir; its tests will skip"
}

for peer in $want; do
    case $peer in
        saelens) venv "${SAEFORGE_SAELENS_VENV:-/opt/saelens-venv}" pipelines/requirements-saelens.txt sae_lens ;;
        circuit-tracer) venv "${SAEFORGE_CIRCUIT_TRACER_VENV:-/opt/circuit-tracer-venv}" pipelines/requirements-circuit-tracer.txt circuit_tracer ;;
        browser)
            if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
                echo "setup_peers: chromium and chromedriver already installed"
            else
                { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null \
                    && echo "setup_peers: chromium and chromedriver installed"; } \
                    || echo "setup_peers: WARNING: chromium could not be installed; the browser tests will skip"
            fi ;;
        *) echo "setup_peers: unknown peer $peer (choose from: saelens circuit-tracer browser)"; exit 2 ;;
    esac
done
exit 0

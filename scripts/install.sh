#!/usr/bin/env bash
# Create .venv (if missing) and install vllm-zipar with the CPU build of vLLM and the test tools.
# Idempotent: a stamp file records the pyproject.toml it installed, so repeated `make` runs are quick.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-cpu,test,ray}
STAMP="$VENV/.vllm-zipar-installed"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[install] creating $VENV"
  python3.11 -m venv "$VENV" 2>/dev/null || python3 -m venv "$VENV"
fi
# Our `vllm` console script (vLLM's CLI plus `vllm serve --decoding`, see docs/serving.md) shares its name with
# vLLM's; pip keeps whichever distribution it installed last, so (re)write ours after every install.
write_vllm_shim() {
  local python
  python="$(cd "$VENV/bin" && pwd)/python"
  cat > "$VENV/bin/vllm" <<EOF
#!$python
# Written by scripts/install.sh (vllm-zipar): vLLM's CLI plus \`vllm serve --decoding\`.
import sys
from vllm_zipar.serving.vllm_command import main
if __name__ == "__main__":
    sys.exit(main())
EOF
  chmod +x "$VENV/bin/vllm"
}

# The playground test drives Debian's Chromium headless (tests/serving/test_playground.py); Playwright's own
# browser download is not reachable here. Needs root (as in CI); a plain `[ -x ]` when it is already there.
install_chromium() {
  [ -x /usr/bin/chromium ] && return 0
  if [ "$(id -u)" != 0 ]; then
    echo "[install] WARNING: /usr/bin/chromium missing and not root: apt-get install chromium (browser test)"
    return 0
  fi
  echo "[install] installing Debian's chromium (headless browser for the playground test)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends chromium >/dev/null
}
install_chromium

if [ -f "$STAMP" ] && cmp -s "$STAMP" pyproject.toml; then
  write_vllm_shim
  exit 0
fi
echo "[install] installing vllm-zipar[$EXTRAS] into $VENV (about 2 minutes the first time)"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e ".[$EXTRAS]"
# The registry builds of these break `import vllm` next to torch 2.13.0+cpu; vLLM does not need them.
"$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" -c "import vllm, vllm_zipar; print('[install] vllm', vllm.__version__, 'ok')"
# Compile the masked attention kernel now (~15 s, into PyTorch's extension cache) rather than at the first
# engine start; without a compiler the engine uses its slower PyTorch path (docs/design.md).
"$VENV/bin/python" -c "from vllm_zipar.engine.masked_kernel import load_masked_kernel as load
print('[install] masked attention kernel:', 'built' if load() else 'NOT built, PyTorch fallback')"
write_vllm_shim
cp pyproject.toml "$STAMP"

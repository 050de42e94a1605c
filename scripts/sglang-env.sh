#!/usr/bin/env bash
# Builds the environment that runs real SGLang on a CPU (`make sglang`), beside the project's
# own venv: SGLang pins torch 2.14.1 and transformers 5.19.0, the project's tests use torch
# 2.13. Prints the interpreter to use; the tests and `sidecar_python` take it from
# APR_SGLANG_PYTHON (default: $ENV/bin/sglang-python).
#
#   scripts/sglang-env.sh [ENV_DIR]      (default .venv-sglang)
set -euo pipefail
cd "$(dirname "$0")/.."
ENV=${1:-.venv-sglang}
PYTHON=${PYTHON:-python3}
SGLANG=sglang==0.5.23
KERNEL=sglang-kernel==0.4.10

if [ -f "$ENV/.installed" ] && [ "$ENV/.installed" -nt scripts/sglang-cpu-requirements.txt ]; then
  echo "$ENV/bin/sglang-python"
  exit 0
fi
rm -f "$ENV/.installed"
"$PYTHON" -m venv "$ENV"
pip_install() {  # quietly: without the warnings of a machine's extra, absent indexes
  "$ENV/bin/python" -m pip install --quiet "$@" 2> >(grep -v "is ignored: it is neither" >&2)
}
echo "building $ENV (SGLang for the CPU, about 8 GB)..." >&2
pip_install --upgrade pip
pip_install -r scripts/sglang-cpu-requirements.txt
pip_install --no-deps "$SGLANG" "$KERNEL"
pip_install --no-deps -e .

# sglang-kernel links libcuda.so.1; without a driver the stand-in satisfies the link.
mkdir -p "$ENV/lib/cuda-stub"
cc -shared -fPIC -O2 -Wl,-soname,libcuda.so.1 -o "$ENV/lib/cuda-stub/libcuda.so.1" scripts/cuda_stub.c

# The interpreter that starts SGLang here: the stand-in only where no driver is found, and
# SGLang's CPU engine. Everything else (flags, env) comes from the caller.
cat > "$ENV/bin/sglang-python" <<WRAPPER
#!/bin/sh
# Python of the SGLang environment, set up for a machine without a GPU driver.
here=\$(cd "\$(dirname "\$0")/.." && pwd)
if ! ldconfig -p 2>/dev/null | grep -q 'libcuda\.so\.1 '; then
  export LD_LIBRARY_PATH="\$here/lib/cuda-stub\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
  export SGLANG_USE_CPU_ENGINE=\${SGLANG_USE_CPU_ENGINE:-1}
fi
exec "\$here/bin/python" "\$@"
WRAPPER
chmod +x "$ENV/bin/sglang-python"
"$ENV/bin/sglang-python" -c "import sglang, sgl_kernel; print('sglang', sglang.__version__)" >&2
touch "$ENV/.installed"
echo "$ENV/bin/sglang-python"

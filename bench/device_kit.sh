#!/usr/bin/env bash
# The kit for running `python -m bench.trainer_gpu` (and, after it, tests/test_gpu.py) on a lent GPU
# machine that has no network: its image has Python 3.12 with torch, transformers, peft, accelerate,
# tokenizers, ... but not at this project's versions, so the wheels it lacks travel in .whl/.
#
#   bench/device_kit.sh plan              # print the wheels and the `pip download` command, run nothing
#   bench/device_kit.sh download          # here (needs PyPI): fill .whl/ with cp312 manylinux wheels
#   bash bench/device_kit.sh run [ARGS]   # there, from the repo root: install .whl/, then the bench;
#                                         # ARGS go to bench.trainer_gpu (e.g. --cpu-smoke, --variants)
#
# What travels, and why (versions are read from constraints.txt, liger-kernel's from the hint in
# backends/local/accelerator.py, so they follow the pins):
#   transformers, peft, tokenizers  the pinned versions (the image has transformers 5.17, tokenizers
#                                   0.23.2 and an unknown peft); all three are pure Python or abi3.
#   liger-kernel                    optional fused kernels (pure Python; needs torch and triton, which
#                                   the image has); `auto` turns them on when installed. Leave it out
#                                   there with DEVICE_KIT_SKIP=liger_kernel.
# Not carried, on purpose: torch (2.11 there, a CUDA build; ours is the CPU 2.13), numpy (2.5 there
# works; 16 MB), accelerate and safetensors (same versions there), huggingface_hub (1.33 there
# satisfies transformers' >=1.31,<3; 2.x would also need httpx2/httpcore2 and nothing here
# reaches the hub: HF_HUB_OFFLINE=1), pydantic/mlflow/datasets (the bench and test_gpu.py don't
# import them; the scoring test skips itself without mlflow).
#
# Environment: PYTHON (default python3), DEVICE_KIT_CONSTRAINTS (default constraints.txt),
# DEVICE_KIT_WHEELS (default .whl), DEVICE_KIT_SITE (default /tmp/site), DEVICE_KIT_SKIP (wheel name
# prefixes not to install), DEVICE_KIT_ALLOW_IMAGE=1 (run on the image's packages when no wheels were
# carried; otherwise that is refused: the figures would describe another stack), DEVICE_KIT_TIMEOUT
# (seconds for the bench, default 400), DEVICE_KIT_TESTS (the GPU tests' pytest -m expression, default
# "gpu and not slow": the bench itself trains the Phi-3-mini-shaped model the slow test builds),
# DEVICE_KIT_TEST_BUDGET (seconds for those tests, default 150; with the bench's, within one 600 s
# device call), DEVICE_KIT_TEST_TIMEOUT (seconds per GPU test, default 240), OUT (where
# device_log.txt goes).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
CONSTRAINTS="${DEVICE_KIT_CONSTRAINTS:-$ROOT/constraints.txt}"
WHEELS="${DEVICE_KIT_WHEELS:-$ROOT/.whl}"
SITE="${DEVICE_KIT_SITE:-/tmp/site}"
ACCELERATOR="$ROOT/backends/local/accelerator.py"
PINNED=(transformers peft tokenizers)
MAX_MIB=50
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64
  manylinux1_x86_64)

usage() {
  cat >&2 <<'EOF'
usage: bench/device_kit.sh plan | download | run [bench.trainer_gpu arguments]
  plan      print the wheels and the pip download command (runs nothing)
  download  fetch them into .whl/ (here, with PyPI)
  run       on the GPU machine, from the repo root: install .whl/, then python3 -m bench.trainer_gpu
EOF
}

die() {
  echo "device_kit: $*" >&2
  exit 1
}

normalize() { # PEP 503: case and runs of - _ . don't matter
  printf '%s\n' "$1" | tr '[:upper:]' '[:lower:]' | sed -E 's/[-_.]+/-/g'
}

pin() { # the version constraints.txt pins NAME to
  local want line name
  want="$(normalize "$1")"
  [[ -f "$CONSTRAINTS" ]] || die "no constraints file at $CONSTRAINTS"
  while IFS= read -r line || [[ -n "$line" ]]; do
    line="${line%%#*}"
    line="${line//[[:space:]]/}"
    [[ "$line" == *==* ]] || continue
    name="${line%%==*}"
    if [[ "$(normalize "$name")" == "$want" ]]; then
      printf '%s\n' "${line#*==}"
      return 0
    fi
  done <"$CONSTRAINTS"
  die "$1 is not pinned (NAME==VERSION) in $CONSTRAINTS"
}

liger_version() { # the version accelerator.py's install hint names
  local version
  version="$(grep -oE 'liger-kernel==[0-9][0-9A-Za-z.+-]*[0-9A-Za-z]' "$ACCELERATOR" | head -n 1)" ||
    die "no 'liger-kernel==VERSION' hint in $ACCELERATOR"
  printf '%s\n' "${version#liger-kernel==}"
}

resolve() { # REQUIREMENTS (NAME==VERSION) and the pip COMMAND that downloads them
  local name version platform
  REQUIREMENTS=()
  for name in "${PINNED[@]}"; do
    version="$(pin "$name")"
    REQUIREMENTS+=("$name==$version")
  done
  version="$(liger_version)"
  REQUIREMENTS+=("liger-kernel==$version")
  COMMAND=("$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp)
  for platform in "${PLATFORMS[@]}"; do
    COMMAND+=(--platform "$platform")
  done
  COMMAND+=(-d "$WHEELS" "${REQUIREMENTS[@]}")
}

plan() {
  resolve
  echo "wheels for the GPU machine (Python 3.12, x86_64), versions from ${CONSTRAINTS#"$ROOT"/}:"
  printf '  %s\n' "${REQUIREMENTS[@]}"
  echo "download command:"
  printf '  %s\n' "${COMMAND[*]}"
}

download() {
  local requirement name version found total
  resolve
  mkdir -p "$WHEELS"
  rm -f "$WHEELS"/*.whl # one version of each: two stop the install there
  echo "+ ${COMMAND[*]}"
  "${COMMAND[@]}"
  for requirement in "${REQUIREMENTS[@]}"; do
    name="$(normalize "${requirement%%==*}" | tr - _)"
    version="${requirement#*==}"
    found="$(find "$WHEELS" -maxdepth 1 -type f -iname "${name}-${version}-*.whl" | wc -l)"
    [[ "$found" == 1 ]] || die "expected one wheel for $requirement in $WHEELS, found $found"
  done
  echo "wheels in ${WHEELS#"$ROOT"/}/:"
  find "$WHEELS" -maxdepth 1 -type f -name '*.whl' -printf '%s %f\n' | sort -k2 |
    awk '{ printf "  %8.2f MiB  %s\n", $1 / 1048576, $2 }'
  total="$(find "$WHEELS" -maxdepth 1 -type f -name '*.whl' -printf '%s\n' | awk '{ s += $1 } END { print s + 0 }')"
  awk -v t="$total" 'BEGIN { printf "total: %.2f MiB\n", t / 1048576 }'
  ((total <= MAX_MIB * 1048576)) || die "the wheels exceed ${MAX_MIB} MiB; the device call carries 64 MiB in all"
}

install_wheels() {
  local -a wheels=()
  local wheel prefix keep
  shopt -s nullglob
  for wheel in "$WHEELS"/*.whl; do
    keep=1
    for prefix in ${DEVICE_KIT_SKIP:-}; do
      [[ "$(basename "$wheel")" == "$prefix"* ]] && keep=0
    done
    ((keep)) && wheels+=("$wheel")
  done
  shopt -u nullglob
  if ((${#wheels[@]} == 0)); then
    [[ "${DEVICE_KIT_ALLOW_IMAGE:-}" == 1 ]] ||
      die "no wheels in $WHEELS: run \`bench/device_kit.sh download\` here and carry .whl to the device (carry: [\".whl\"]); DEVICE_KIT_ALLOW_IMAGE=1 runs on the image's packages instead"
    echo "device_kit: no wheels in $WHEELS: using the image's packages as they are (DEVICE_KIT_ALLOW_IMAGE=1)"
    return 0
  fi
  # A fresh folder each run: on a warm machine a wheel skipped now must not linger from the last run.
  if [[ -e "$SITE" && ! -e "$SITE/.device_kit" ]]; then
    die "$SITE exists and is not the kit's own: set DEVICE_KIT_SITE to another folder"
  fi
  rm -rf "$SITE"
  mkdir -p "$SITE"
  touch "$SITE/.device_kit"
  echo "device_kit: installing ${#wheels[@]} wheels into $SITE: $(basename -a "${wheels[@]}" | tr '\n' ' ')"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "${wheels[@]}"
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
}

report_versions() {
  "$PYTHON" - <<'EOF'
import importlib.util, sys
import torch, transformers, peft, tokenizers
print(f"python {sys.version.split()[0]} ({sys.executable})")
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}, available: {torch.cuda.is_available()})")
print(f"transformers {transformers.__version__} ({transformers.__file__})")
print(f"peft {peft.__version__}; tokenizers {tokenizers.__version__}")
liger = importlib.util.find_spec("liger_kernel")
print(f"liger-kernel: {'installed (' + liger.origin + ')' if liger else 'not installed'}")
EOF
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  else
    echo "nvidia-smi: not found (no NVIDIA GPU here)"
  fi
}

run_inner() {
  local started=$SECONDS rc=0 tests_rc=0
  local marks="${DEVICE_KIT_TESTS:-gpu and not slow}"
  cd "$ROOT"
  echo "device_kit run: $(date -u +%FT%TZ) in $ROOT; bench arguments: ${*:-(none)}"
  install_wheels
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" # the bench imports backends.local...
  export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
  report_versions
  echo "+ $PYTHON -m bench.trainer_gpu --no-tests $* (time limit ${DEVICE_KIT_TIMEOUT:-400} s)"
  timeout --signal=INT --kill-after=20 "${DEVICE_KIT_TIMEOUT:-400}" \
    "$PYTHON" -m bench.trainer_gpu --no-tests "$@" || rc=$?
  ((rc != 124)) || echo "device_kit: the bench ran past ${DEVICE_KIT_TIMEOUT:-400} s and was stopped"
  # The GPU tests in a process of their own, after the bench's has ended and given the card's memory
  # back (its allocator would otherwise keep what it planned to fill); each test bounded and timed.
  echo "+ $PYTHON -m pytest -m '$marks' tests/test_gpu.py (time limit ${DEVICE_KIT_TEST_BUDGET:-150} s)"
  timeout --signal=INT --kill-after=20 "${DEVICE_KIT_TEST_BUDGET:-150}" \
    "$PYTHON" -m pytest -m "$marks" tests/test_gpu.py -q -p no:cacheprovider \
    "--timeout=${DEVICE_KIT_TEST_TIMEOUT:-240}" --durations=0 || tests_rc=$?
  ((tests_rc != 124)) || echo "device_kit: the GPU tests ran past ${DEVICE_KIT_TEST_BUDGET:-150} s and were stopped"
  echo "device_kit run: bench exit code $rc, tests exit code $tests_rc, after $((SECONDS - started)) s"
  ((rc != 0)) && return "$rc"
  return "$tests_rc"
}

run() {
  local log=/dev/null
  if [[ -n "${OUT:-}" ]]; then
    mkdir -p "$OUT"
    log="$OUT/device_log.txt"
  fi
  # A plain statement (no || or &&), so errexit holds inside run_inner; pipefail gives its code.
  run_inner "$@" 2>&1 | tee "$log"
}

main() {
  local verb="${1:-}"
  (($#)) && shift
  case "$verb" in
  plan) plan ;;
  download) download ;;
  run) run "$@" ;;
  -h | --help | help) usage ;;
  *)
    [[ -n "$verb" ]] && echo "device_kit: unknown verb '$verb'" >&2
    usage
    exit 2
    ;;
  esac
}

main "$@"

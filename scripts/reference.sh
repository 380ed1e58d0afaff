#!/usr/bin/env bash
# reference.sh - build llama.cpp's own tools, the oracle tidald is checked against, from the
# llama.cpp that PyPI's llama-cpp-python source distribution vendors. Everything happens
# outside the repo, in $TIDALD_REFERENCE_DIR (default ~/.cache/tidald-reference): the sdist
# is fetched with pip at a pinned version and sha256, unpacked, and llama.cpp's CMake build
# makes llama-cli, llama-completion, llama-perplexity, llama-bench, llama-tokenize and
# llama-quantize. We run these programs; we never copy their code.
#
# Usage: scripts/reference.sh            build (or reuse) the tools; prints the bin directory
#        make reference                  the same
# The version of llama.cpp that was built is written to $REF/VERSION, for fixtures to record.
set -euo pipefail

VERSION=0.3.36
SDIST_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
REF=${TIDALD_REFERENCE_DIR:-$HOME/.cache/tidald-reference}
JOBS=${JOBS:-$(nproc)}
TOOLS=(llama-cli llama-completion llama-perplexity llama-bench llama-tokenize llama-quantize)

case "$(realpath -m "$REF")/" in
"$(realpath "$(dirname "$0")/..")"/*)
    echo "reference.sh: $REF is inside the repo; choose a directory outside it" >&2
    exit 2
    ;;
esac
mkdir -p "$REF"
cd "$REF"
SDIST="llama_cpp_python-$VERSION.tar.gz"
if [ ! -f "$SDIST" ] || [ "$(sha256sum "$SDIST" | cut -d' ' -f1)" != "$SDIST_SHA256" ]; then
    rm -f "$SDIST"
    python3 -m pip download --no-deps --no-binary :all: --disable-pip-version-check -q \
        -d . "llama-cpp-python==$VERSION"
fi
got=$(sha256sum "$SDIST" | cut -d' ' -f1)
if [ "$got" != "$SDIST_SHA256" ]; then
    echo "reference.sh: $SDIST has sha256 $got, expected $SDIST_SHA256" >&2
    exit 1
fi
SRC="llama_cpp_python-$VERSION/vendor/llama.cpp"
[ -d "$SRC" ] || tar xzf "$SDIST"
BUILD="build-$VERSION"
built() {
    for t in "${TOOLS[@]}"; do [ -x "$BUILD/bin/$t" ] || return 1; done
}
# The CPU's own instruction sets, as -march=native would pick them, but without AMX: the
# tile instructions need a permission from the kernel that virtual machines (this one
# included) may not grant, and llama.cpp then dies of SIGSEGV/SIGILL in its AMX matmul.
cpu_flags() {
    local flags opts=()
    flags=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
    has() { [[ "$flags" == *" $1 "* ]]; }
    has avx && opts+=(-DGGML_AVX=ON)
    has avx2 && opts+=(-DGGML_AVX2=ON)
    has fma && opts+=(-DGGML_FMA=ON)
    has f16c && opts+=(-DGGML_F16C=ON)
    has bmi2 && opts+=(-DGGML_BMI2=ON)
    has avx_vnni && opts+=(-DGGML_AVX_VNNI=ON)
    if has avx512f && has avx512bw && has avx512dq && has avx512vl; then
        opts+=(-DGGML_AVX512=ON)
        has avx512vbmi && opts+=(-DGGML_AVX512_VBMI=ON)
        has avx512_vnni && opts+=(-DGGML_AVX512_VNNI=ON)
        has avx512_bf16 && opts+=(-DGGML_AVX512_BF16=ON)
    fi
    echo "${opts[@]}"
}
if ! built; then
    # shellcheck disable=SC2046
    cmake -S "$SRC" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DGGML_NATIVE=OFF \
        -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF $(cpu_flags) \
        >"$BUILD.cmake.log"
    cmake --build "$BUILD" -j "$JOBS" --target "${TOOLS[@]}" >"$BUILD.build.log"
fi
ver=$("$BUILD/bin/llama-cli" --version 2>&1 | grep -m1 -i 'version' || true)
echo "llama-cpp-python $VERSION; llama.cpp ${ver:-unknown}; cpu: $(cpu_flags)" >VERSION
echo "$REF/$BUILD/bin"

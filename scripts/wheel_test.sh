#!/usr/bin/env bash
# `make wheel-test`: the test suite against the wheel, not against src/ (CI's tests job, locally).
#
#   1. build the sdist, then the wheel from that sdist (`python -m build`), into a fresh
#      directory, and copy both to dist/: a file missing from the sdist fails here, not on PyPI;
#   2. install the wheel with its [test] and [prometheus] extras into a new virtual environment;
#   3. copy tests/ and pyproject.toml (for [tool.pytest.ini_options]) to a temporary directory
#      that has no src/, and run pytest there with that environment's Python.
#
# Exits with pytest's status (non-zero on any failure). Extra arguments go to pytest:
#   scripts/wheel_test.sh -x -k cage
# Environment: PYTHON (the interpreter to build and test with, default python3), BUILD_ARGS
# (e.g. "--wheel" to skip the sdist, or "--no-isolation" offline), KEEP=1 keeps the temporary
# directory for a look afterwards.
set -euo pipefail

PYTHON=${PYTHON:-python3}
BUILD_ARGS=${BUILD_ARGS:-}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/pmq-wheel-test.XXXXXX")
if [ "${KEEP:-0}" = 1 ]; then
  echo "wheel-test: keeping $work"
else
  trap 'rm -rf "$work"' EXIT
fi

# The scripts of a venv live in bin/ on POSIX and in Scripts/ on Windows (Git Bash).
venv_python() {
  if [ -x "$1/bin/python" ]; then echo "$1/bin/python"; else echo "$1/Scripts/python"; fi
}

started=$(date +%s)

echo "wheel-test: building with $("$PYTHON" --version 2>&1) in $work"
"$PYTHON" -m venv "$work/build-env"
build_py=$(venv_python "$work/build-env")
"$build_py" -m pip install --quiet --disable-pip-version-check build
# shellcheck disable=SC2086  # BUILD_ARGS is a list of options
"$build_py" -m build $BUILD_ARGS --outdir "$work/dist" "$root"
mkdir -p "$root/dist"
cp "$work"/dist/* "$root/dist/"

wheels=("$work"/dist/*.whl)
if [ "${#wheels[@]}" -ne 1 ] || [ ! -f "${wheels[0]}" ]; then
  echo "wheel-test: expected one wheel in $work/dist, found: ${wheels[*]}" >&2
  exit 1
fi
wheel=${wheels[0]}
echo "wheel-test: built $(basename "$wheel") (copied to dist/)"

"$PYTHON" -m venv "$work/venv"
py=$(venv_python "$work/venv")
"$py" -m pip install --quiet --disable-pip-version-check "${wheel}[test,prometheus]"

# No src/ and no checkout on the path: `import pmq` can only find the installed wheel.
mkdir "$work/project"
cp -R "$root/tests" "$work/project/tests"
cp "$root/pyproject.toml" "$work/project/"
find "$work/project/tests" -name __pycache__ -prune -exec rm -rf {} +
cd "$work/project"
unset PYTHONPATH
where=$("$py" -c "import pmq, pmq._journal as j; print(pmq.__file__); print(j.__file__)")
echo "wheel-test: pmq under test:"
echo "$where" | sed 's/^/  /'
case "$where" in
  *"$root/src"*) echo "wheel-test: pmq was imported from the checkout" >&2; exit 1 ;;
esac

status=0
"$py" -m pytest -q tests "$@" || status=$?
echo "wheel-test: pytest exited with $status after $(( $(date +%s) - started )) s in all"
exit "$status"

#!/usr/bin/env bash
# The Python package's tests, as a user installs it: a fresh venv, `pip install ".[test]"` from
# this checkout (maturin builds the extension), then pytest over crates/ferroformers-py/tests.
#
# The wheel is built with cargo's `test` profile here (MATURIN_PEP517_ARGS), so it reuses what
# `cargo test --workspace` just compiled; a plain `pip install .` builds the release profile.
# FERROFORMERS_PY_VENV picks the venv folder (default target/py-venv, rebuilt each run).
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${FERROFORMERS_PY_VENV:-target/py-venv}
python3 -m venv --clear "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
MATURIN_PEP517_ARGS="${MATURIN_PEP517_ARGS:---profile test}" \
    "$venv/bin/python" -m pip install -q ".[test]"
"$venv/bin/python" -m pytest -q crates/ferroformers-py/tests

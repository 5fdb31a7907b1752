#!/usr/bin/env bash
# The Python package's tests, as a user installs it: a fresh venv, `pip install ".[test]"` from
# this checkout (maturin builds the extension), then pytest over crates/ferroformers-py/tests.
#
# The wheel is built with cargo's `dev` profile here (MATURIN_PEP517_ARGS), which reuses the
# dependencies `cargo test --workspace` just compiled (they are optimised in every profile); a
# plain `pip install .` builds the release profile. (Not `--profile test`: cargo builds a
# test harness executable under that name, which Python cannot load.)
# FERROFORMERS_PY_VENV picks the venv folder (default target/py-venv, rebuilt each run).
# test_clients.py drives the CLI's `serve` with the openai SDK and huggingface_hub: it needs the
# binary `cargo test --workspace` builds (target/debug/ferroformers, or $FERROFORMERS_BIN), and
# fails here without one instead of skipping.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${FERROFORMERS_PY_VENV:-target/py-venv}
python3 -m venv --clear "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
MATURIN_PEP517_ARGS="${MATURIN_PEP517_ARGS:---profile dev}" \
    "$venv/bin/python" -m pip install -q ".[test]"
FERROFORMERS_REQUIRE_BIN=1 "$venv/bin/python" -m pytest -q crates/ferroformers-py/tests

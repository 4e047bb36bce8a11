#!/usr/bin/env bash
# The layout check `tox -e lint` runs: the tree is as `ruff format` writes it, and `ruff check`
# (E501 included: code wraps at 100 columns, strings and comments the formatter cannot wrap at 160)
# is clean. To fix a failure: `ruff format core adapters plugins tests benchmarks examples`.
set -euo pipefail
cd "$(dirname "$0")/.."
folders=(core adapters plugins tests benchmarks examples)
python -m ruff format --check "${folders[@]}"
python -m ruff check "${folders[@]}"

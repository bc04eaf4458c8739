#!/usr/bin/env bash
# Set up every ComfyUI host of devkit/hosts.json and the browser (idempotent), then run the tests once per
# host, the current host first: the whole suite, or the host's "tests" selection of hosts.json (0.3.75: a
# compatibility subset, to keep .ci/run within its time budget). Extra arguments go to pytest, e.g.
#   bash scripts/test.sh -m "not e2e"                    # math + in-process ComfyUI only (within each host's tests)
#   bash scripts/test.sh tests/unit/test_merge_cli.py    # paths given: exactly those, on every host
#   LORARAR_TEST_HOSTS=0.33.0 bash scripts/test.sh       # one host only
#   LORARAR_FULL_SUITE=1 bash scripts/test.sh            # the whole suite on every host (no selection)
set -uo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HOSTS="${LORARAR_TEST_HOSTS:-$(python3 "$REPO/devkit/hosts.py" list)}"
for version in $HOSTS; do
  bash "$REPO/scripts/setup_host.sh" "$version" || { echo "[test] host $version failed to install" >&2; exit 1; }
done
# Not fatal: without Chromium the browser test skips (or fails under LORARAR_REQUIRE_BROWSER=1, as in CI)
# and every other test still runs.
if ! bash "$REPO/scripts/install_browser.sh"; then
  echo "[test] WARNING: scripts/install_browser.sh failed: Chromium is missing, tests/e2e/test_browser.py will skip" \
       "(or fail when LORARAR_REQUIRE_BROWSER=1)" >&2
  export LORARAR_BROWSER_INSTALL_FAILED=1   # the test does not try the install a second time
fi
cd "$REPO"
# Test paths among the arguments (a file, a folder, a node id) replace every host's selection.
paths_given=0
for arg in "$@"; do
  case "$arg" in -*) ;; *) [ -e "${arg%%::*}" ] && paths_given=1 ;; esac
done
status=0
summary=()
for version in $HOSTS; do
  folder="$(python3 "$REPO/devkit/hosts.py" get "$version" folder)"
  selection=()
  scope="$([ "$paths_given" = 1 ] && echo "the tests named" || echo "whole suite")"
  if [ "$paths_given" = 0 ] && [ -z "${LORARAR_FULL_SUITE:-}" ]; then
    # word-split and glob-expanded here, in the repository root: hosts.json may name tests/unit/*golden*.py
    read -r -a patterns <<< "$(python3 "$REPO/devkit/hosts.py" get "$version" tests)"
    for pattern in "${patterns[@]}"; do
      matched=( $pattern )
      [ -e "${matched[0]}" ] || { echo "[test] devkit/hosts.json: host $version's test $pattern matches no file" >&2; exit 2; }
      selection+=("${matched[@]}")
    done
    [ ${#selection[@]} -gt 0 ] && scope="compatibility subset of devkit/hosts.json"
  fi
  echo "================ ComfyUI host $version ($folder): $scope ================"
  start=$SECONDS
  LORARAR_COMFY="$folder/ComfyUI" LORARAR_PYTHON="$folder/venv/bin/python" "$folder/venv/bin/python" -m pytest "${selection[@]}" "$@"
  rc=$?
  summary+=("ComfyUI $version ($scope): $([ $rc -eq 0 ] && echo passed || echo "FAILED (pytest exit $rc)") in $((SECONDS - start)) s")
  # pytest's 5 (no tests collected) is kept as it is: .ci/run decides what it means
  if [ $rc -ne 0 ] && { [ $status -eq 0 ] || [ $status -eq 5 ]; }; then status=$rc; fi
done
printf '[test] %s\n' "${summary[@]}"
exit $status

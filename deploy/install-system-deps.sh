#!/usr/bin/env bash
# Installs the system packages the project needs, only those missing: `java` (TorchServe's frontend)
# and/or `prometheus` (Prometheus and promtool, for the monitoring tests and `make monitor`);
# and/or `browser` (headless Chromium and chromedriver, for the viewer's browser test);
# `wrk` (the HTTP load generator of the end-to-end benchmarks) only when named.
# Usage: install-system-deps.sh [java] [prometheus] [browser] [wrk]
#        (no argument: java, prometheus and browser, which is what `make test` needs)
set -euo pipefail
wanted=("$@")
[ ${#wanted[@]} -eq 0 ] && wanted=(java prometheus browser)
missing=()
for component in "${wanted[@]}"; do
  case "$component" in
    java) command -v java >/dev/null 2>&1 || missing+=(openjdk-17-jre-headless) ;;
    prometheus) { command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; } || missing+=(prometheus) ;;
    # Debian's chromium-driver matches its chromium build, so no driver download is ever needed.
    browser) { command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; } || missing+=(chromium chromium-driver) ;;
    wrk) command -v wrk >/dev/null 2>&1 || missing+=(wrk) ;;
    *) echo "error: unknown component '$component' (java, prometheus, browser, wrk)" >&2; exit 2 ;;
  esac
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "error: missing system packages: ${missing[*]} (run this script as root, or install them with apt-get)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${missing[@]}"

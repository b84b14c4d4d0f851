#!/usr/bin/env bash
# Installs the system packages the project needs, only those missing: `java` (TorchServe's frontend),
# `prometheus` (Prometheus and promtool, for the monitoring tests and `make monitor`), `haproxy`
# (the load balancer of the replica test) and `browser` (headless Chromium and chromedriver, for the
# viewer's browser test); only when named: `wrk` (the HTTP load generator of the end-to-end
# benchmarks) and `image` (buildah, podman, runc and debootstrap for `make image`).
# kubectl (its kustomize renders deploy/) is not a Debian package: the tests that need it skip
# without it.
# Usage: install-system-deps.sh [java] [prometheus] [haproxy] [browser] [wrk] [image]
#        (no argument: java, prometheus, haproxy and browser, which is what `make test` needs)
set -euo pipefail
wanted=("$@")
[ ${#wanted[@]} -eq 0 ] && wanted=(java prometheus haproxy browser)
missing=()
for component in "${wanted[@]}"; do
  case "$component" in
    java) command -v java >/dev/null 2>&1 || missing+=(openjdk-17-jre-headless) ;;
    prometheus) { command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; } || missing+=(prometheus) ;;
    haproxy) { command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ]; } || missing+=(haproxy) ;;
    # Debian's chromium-driver matches its chromium build, so no driver download is ever needed.
    browser) { command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; } || missing+=(chromium chromium-driver) ;;
    wrk) command -v wrk >/dev/null 2>&1 || missing+=(wrk) ;;
    image)
      for tool in buildah podman runc debootstrap; do
        { command -v "$tool" >/dev/null 2>&1 || [ -x "/usr/sbin/$tool" ]; } || missing+=("$tool")
      done ;;
    *) echo "error: unknown component '$component' (java, prometheus, haproxy, browser, wrk, image)" >&2; exit 2 ;;
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

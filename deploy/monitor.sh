#!/usr/bin/env bash
# Starts Prometheus in the foreground, scraping TorchServe's metrics endpoint and evaluating
# deploy/prometheus/alerts.yml. Ctrl-C stops it.
#
#   PROMETHEUS_ADDRESS  where Prometheus listens          (default 127.0.0.1:9090)
#   TS_METRICS_ADDRESS  TorchServe's metrics_address       (default 127.0.0.1:8082; host:port or http(s)://host:port)
#   PROMETHEUS_DATA     storage and effective config dir  (default <repo>/run/prometheus)
# Extra arguments are passed to prometheus (e.g. --storage.tsdb.retention.time=2d).
#
# The effective config is run/prometheus/prometheus.yml: deploy/prometheus/prometheus.yml with the
# scrape target replaced and the rule file path made absolute. If prometheus is missing and this
# runs as root, it is installed with apt-get (Debian package "prometheus").
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
template="$root/deploy/prometheus/prometheus.yml"
rules="$root/deploy/prometheus/alerts.yml"
listen="${PROMETHEUS_ADDRESS:-127.0.0.1:9090}"
target="${TS_METRICS_ADDRESS:-127.0.0.1:8082}"
data="${PROMETHEUS_DATA:-$root/run/prometheus}"

bash "$root/deploy/install-system-deps.sh" prometheus

# TorchServe writes addresses as URLs (http://127.0.0.1:8082); Prometheus wants host:port + scheme.
scheme=http
case "$target" in
  https://*) scheme=https; target="${target#https://}" ;;
  http://*) target="${target#http://}" ;;
esac
target="${target%%/*}"
if ! [[ "$target" =~ ^[A-Za-z0-9._-]+:[0-9]+$ || "$target" =~ ^\[[0-9A-Fa-f:]+\]:[0-9]+$ ]]; then
  echo "monitor.sh: TS_METRICS_ADDRESS must be host:port, got '${TS_METRICS_ADDRESS:-}'" >&2
  exit 2
fi
if ! [[ "$listen" =~ ^[A-Za-z0-9._-]*:[0-9]+$ || "$listen" =~ ^\[[0-9A-Fa-f:]+\]:[0-9]+$ ]]; then
  echo "monitor.sh: PROMETHEUS_ADDRESS must be host:port, got '$listen'" >&2
  exit 2
fi

mkdir -p "$data/data"
config="$data/prometheus.yml"
# The template's only target is "127.0.0.1:8082" and its only rule file "alerts.yml".
sed -e "s|\"127.0.0.1:8082\"|\"$target\"|" \
    -e "s|^\(  *\)- alerts.yml\$|\1- \"$rules\"|" \
    -e "s|^\(    metrics_path: /metrics\)\$|\1\n    scheme: $scheme|" \
    "$template" > "$config"
grep -q "\"$target\"" "$config" && grep -q "\"$rules\"" "$config" || {
  echo "monitor.sh: could not substitute the target/rules in $template" >&2; exit 1; }

if command -v promtool >/dev/null 2>&1; then
  if ! out="$(promtool check config "$config" 2>&1)"; then
    echo "$out" >&2
    exit 1
  fi
fi

echo "monitor.sh: Prometheus on http://$listen scraping $scheme://$target/metrics (config $config, data $data/data)" >&2
cd "$data"
exec prometheus \
  --config.file="$config" \
  --storage.tsdb.path="$data/data" \
  --web.listen-address="$listen" \
  "$@"

#!/usr/bin/env bash
# Make sure the system programs pgbeat and its tests use are installed.
# As root, missing ones are installed with apt; otherwise this stops with a message naming them.
set -euo pipefail

declare -A package_of=(
  [pg_config]=postgresql [initdb]=postgresql [pg_dump]=postgresql [psql]=postgresql
  [redis-server]=redis-server [gzip]=gzip [sha256sum]=coreutils [runuser]=util-linux
  [promtool]=prometheus [age]=age [age-keygen]=age
  [sshd]=openssh-server [ssh]=openssh-client [ssh-keygen]=openssh-client
)
want=("$@")
[ ${#want[@]} -gt 0 ] || want=(pg_config pg_dump psql gzip sha256sum)

have() {
  case "$1" in
    initdb|pg_dump|psql) command -v pg_config >/dev/null && [ -x "$(pg_config --bindir)/$1" ] ;;
    sshd) [ -x /usr/sbin/sshd ] || command -v sshd >/dev/null ;;
    *) command -v "$1" >/dev/null ;;
  esac
}

missing=()
for cmd in "${want[@]}"; do
  have "$cmd" || missing+=("${package_of[$cmd]:-$cmd}")
done
[ ${#missing[@]} -eq 0 ] && exit 0
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)

if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
  echo "Installing missing system packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  exit 0
fi
echo "Missing system packages: ${missing[*]}" >&2
echo "Install them (e.g. sudo apt-get install -y ${missing[*]}) and run this again." >&2
exit 1

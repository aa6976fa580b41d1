# Sourced by scripts/test and scripts/build-release: Debian packages they need.

have() { command -v "$1" >/dev/null 2>&1; }

# install_missing WHO PACKAGE...: apt-get install the packages (if any are
# named); only root may, anyone else is told what to install.
install_missing() {
  local who=$1
  shift
  [ "$#" -gt 0 ] || return 0
  if [ "$(id -u)" -ne 0 ]; then
    echo "$who: missing $*; install them (apt-get install $*) or run as root" >&2
    exit 1
  fi
  echo "$who: installing $*" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

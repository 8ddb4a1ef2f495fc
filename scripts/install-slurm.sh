#!/usr/bin/env bash
# Installs the Slurm and MUNGE packages that the Slurm tests (tests/launch/, marked `slurm`) run a real
# two-node cluster with, on one Debian/Ubuntu machine. Only the packages: the tests write their own munge
# key and slurm.conf into a temporary directory and start and stop the daemons themselves, so nothing
# here configures or starts a service.
#   sudo bash scripts/install-slurm.sh
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client munge)

have_all() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
    && command -v munged >/dev/null
}

if have_all; then
  echo "slurm and munge already installed: $(slurmctld -V)"
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "install-slurm.sh: error: needs apt-get (Debian/Ubuntu); install ${PACKAGES[*]} with your package manager" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null || { echo "install-slurm.sh: error: run as root (or install sudo)" >&2; exit 1; }
  SUDO=sudo
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends "${PACKAGES[@]}"
# The packages' own services (if an init system started them) use /etc/munge and /etc/slurm; the tests
# never rely on them, and leave them as they are.
have_all || { echo "install-slurm.sh: error: packages installed but slurmctld/slurmd/sbatch/munged not on PATH" >&2; exit 1; }
echo "installed: $(slurmctld -V)"

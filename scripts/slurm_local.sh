#!/usr/bin/env bash
# A real single-node SLURM on this machine, for the `slurm` tests and for trying
# `adapterbench run STUDY --launcher slurm` without a cluster: installs slurm-wlm and munge from
# Debian's packages when missing, writes a one-node configuration for this host, starts munged,
# slurmctld and slurmd (as root, as CI runs), and waits until the node takes jobs.
#   sudo bash scripts/slurm_local.sh          (idempotent: a running SLURM is left as it is)
set -euo pipefail
if sinfo -h -o %T 2>/dev/null | grep -qE "idle|mixed|alloc"; then echo "slurm: already up"; exit 0; fi
if [ "$(id -u)" != 0 ]; then echo "slurm_local.sh: run as root (it installs and starts daemons)" >&2; exit 2; fi
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi
HOST=$(hostname -s)
CPUS=$(nproc)
MEM=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 3 / 4 ))
CONF=/etc/slurm/slurm.conf
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge /etc/munge
cat > "$CONF" <<CONF
ClusterName=adapterbench
SlurmctldHost=$HOST
AuthType=auth/munge
SlurmUser=root
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
ReturnToService=2
SchedulerType=sched/backfill
MpiDefault=none
KillWait=5
NodeName=$HOST CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF
rm -f /etc/slurm/cgroup.conf   # no cgroups in containers: slurmd 22.05 would refuse to start with cgroup plugins
[ -s /etc/munge/munge.key ] || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
chmod 400 /etc/munge/munge.key
pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged
pgrep -x slurmctld >/dev/null || /usr/sbin/slurmctld
pgrep -x slurmd >/dev/null || /usr/sbin/slurmd
for _ in $(seq 60); do
  if sinfo -h -o %T 2>/dev/null | grep -qE "idle|mixed"; then echo "slurm: up ($HOST, $CPUS CPUs)"; exit 0; fi
  scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true
  sleep 1
done
echo "slurm_local.sh: the node did not come up; see /var/log/slurm/*.log" >&2
exit 1

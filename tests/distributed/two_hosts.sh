#!/bin/sh
# two_hosts.sh: run an MPI job as two "hosts" on this machine, over TCP (root only).
#
#   sudo tests/distributed/two_hosts.sh python -m mpi4py tests/distributed/dp_train.py --out r.npz --batch 4
#
# Makes two network namespaces joined by a veth pair (10.77.0.1 and 10.77.0.2), each process started in one with
# its own hostname (unshare --uts): without distinct hostnames MPICH would see one node and use shared memory.
# mpiexec (MPICH's hydra) runs in the first namespace and starts one rank per "host" through a launcher that
# stands in for ssh. Everything is removed on exit. Needs: ip (iproute2), unshare (util-linux), MPICH's mpiexec
# on PATH (the mpich wheel puts it next to python).
set -eu
A=cfhost-a
B=cfhost-b
LAUNCHER=$(mktemp /tmp/cf-launch.XXXXXX)
cleanup() {
  ip netns del "$A" 2>/dev/null || true
  ip netns del "$B" 2>/dev/null || true
  rm -rf "/etc/netns/$A" "/etc/netns/$B" "$LAUNCHER"
}
trap cleanup EXIT INT TERM
cleanup
ip netns add "$A"
ip netns add "$B"
ip link add cf0 netns "$A" type veth peer name cf0 netns "$B"
ip -n "$A" addr add 10.77.0.1/24 dev cf0
ip -n "$B" addr add 10.77.0.2/24 dev cf0
for ns in "$A" "$B"; do
  ip -n "$ns" link set lo up
  mkdir -p "/etc/netns/$ns"  # ip netns exec bind-mounts this hosts file over /etc/hosts
  printf '127.0.0.1 localhost\n10.77.0.1 %s\n10.77.0.2 %s\n' "$A" "$B" >"/etc/netns/$ns/hosts"
done
ip -n "$A" link set cf0 up
ip -n "$B" link set cf0 up
for _ in 1 2 3 4 5 6 7 8 9 10; do  # the carrier comes up asynchronously; MPI's transports skip a down link
  if ip -n "$A" -br link show cf0 | grep -q ' UP ' && ip -n "$B" -br link show cf0 | grep -q ' UP '; then break; fi
  sleep 0.5
done

# The "ssh" hydra calls: [options] host command...; runs command in that host's namespace under its hostname.
cat >"$LAUNCHER" <<'LAUNCH'
#!/bin/sh
while [ $# -gt 0 ]; do case "$1" in -*) shift ;; *) break ;; esac; done
host=$1
shift
exec ip netns exec "$host" unshare --uts sh -c "hostname $host; exec $*"
LAUNCH
chmod +x "$LAUNCHER"

MPIEXEC=${MPIEXEC:-mpiexec}
ip netns exec "$A" unshare --uts sh -c "hostname $A; exec $MPIEXEC -launcher ssh -launcher-exec $LAUNCHER \
  -hosts $A,$B -n 2 -ppn 1 -genv UCX_TLS tcp,self -genv UCX_NET_DEVICES cf0 $*"

#!/bin/sh
# /init of the guestlink test VM (PID 1, busybox ash). Never exits.
#
# Kernel command line switches (read from /proc/cmdline):
#   guestlink.noagent=1      do not start the agent
#   guestlink.args=BASE64    extra agent arguments, base64 of newline-separated args
#   guestlink.nports=N       wait (up to 10 s) until N named virtio ports exist
#   guestlink.noqga=1        do not start qemu-ga even if its port exists
# Extra agent arguments also come from /etc/guestlink/agent-args (one per line;
# put there by the per-boot overlay cpio).

export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 PYTHONUNBUFFERED=1 TERM=dumb

say() { echo "guestlink-testvm: $*"; }
say "init started"   # the host tells "kernel never reached userspace" from later trouble by this

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm /dev/virtio-ports
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t tmpfs -o mode=1777 tmpfs /tmp
hostname -F /etc/hostname
ip link set lo up 2>/dev/null

NOAGENT=0
NOQGA=0
NPORTS=0
ARGS_B64=
for w in $(cat /proc/cmdline); do
    case "$w" in
        guestlink.noagent=1) NOAGENT=1 ;;
        guestlink.noqga=1) NOQGA=1 ;;
        guestlink.nports=*) NPORTS="${w#guestlink.nports=}" ;;
        guestlink.args=*) ARGS_B64="${w#guestlink.args=}" ;;
    esac
done

# virtio modules, in dependency order (list written at build time).
KVER=$(uname -r)
while read -r m; do
    [ -n "$m" ] || continue
    insmod "/lib/modules/$KVER/$m" || say "insmod $m failed"
done < /etc/guestlink-testvm/modules

# /dev/virtio-ports/NAME symlinks (there is no udev). Port names arrive
# asynchronously after the driver probes, so wait for the expected count.
i=0
while :; do
    n=0
    for p in /sys/class/virtio-ports/*; do
        [ -e "$p/name" ] || continue
        name=$(cat "$p/name")
        [ -n "$name" ] || continue
        n=$((n + 1))
    done
    [ "$n" -ge "$NPORTS" ] && break
    i=$((i + 1))
    if [ "$i" -ge 200 ]; then
        say "WARNING: only $n of $NPORTS virtio ports appeared"
        break
    fi
    sleep 0.05
done
for p in /sys/class/virtio-ports/*; do
    [ -e "$p/name" ] || continue
    name=$(cat "$p/name")
    dev=${p##*/}
    if [ -n "$name" ]; then
        ln -sf "../$dev" "/dev/virtio-ports/$name"
        say "port $name -> /dev/$dev"
    else
        say "port (unnamed) /dev/$dev"
    fi
done

# Agent arguments: overlay file first, then guestlink.args=BASE64.
set --
if [ -f /etc/guestlink/agent-args ]; then
    while IFS= read -r a || [ -n "$a" ]; do set -- "$@" "$a"; done < /etc/guestlink/agent-args
fi
if [ -n "$ARGS_B64" ]; then
    echo "$ARGS_B64" | base64 -d > /run/guestlink-cmdline-args 2>/dev/null || say "bad guestlink.args"
    while IFS= read -r a || [ -n "$a" ]; do set -- "$@" "$a"; done < /run/guestlink-cmdline-args
fi

# busybox halt/poweroff/reboot without -f signal PID 1 (USR1/USR2/TERM).
trap 'say "poweroff requested"; /sbin/poweroff' USR2
trap 'say "halt requested"; /sbin/poweroff' USR1
trap 'say "reboot requested"; /sbin/reboot' TERM
trap '' INT HUP

# Debian's qemu-guest-agent on its own port (org.qemu.guest_agent.0), when the VM has that port:
# like on a distribution VM, it runs independently of the guestlink agent (respawned if it dies).
QGA_DEV=/dev/virtio-ports/org.qemu.guest_agent.0
if [ -e "$QGA_DEV" ] && [ -x /usr/sbin/qemu-ga ]; then
    if [ "$NOQGA" = 1 ]; then
        say "qemu-ga disabled"
    else
        mkdir -p /run/qemu-ga
        (
            trap - USR1 USR2 TERM
            while :; do
                /usr/sbin/qemu-ga -m virtio-serial -p "$QGA_DEV" -t /run/qemu-ga </dev/null >/dev/console 2>&1 &
                qpid=$!
                echo "$qpid" > /run/qemu-ga.pid
                say "qemu-ga started (pid $qpid)"
                wait "$qpid"
                say "qemu-ga exited (status $?), respawning"
                sleep 0.5
            done
        ) &
    fi
fi

read -r up _ < /proc/uptime
say "ready (uptime ${up}s)"

if [ "$NOAGENT" = 1 ] || [ ! -f /opt/guestlink/guestlink-agent.pyz ]; then
    [ "$NOAGENT" = 1 ] || say "no agent in /opt/guestlink/guestlink-agent.pyz"
    say "agent disabled"
    while :; do sleep 3600 & wait $!; done
fi

while :; do
    if [ -e /run/guestlink-stopping ]; then
        sleep 3600 & wait $!
        continue
    fi
    python3 /opt/guestlink/guestlink-agent.pyz run --log-level debug "$@" </dev/null >/dev/console 2>&1 &
    pid=$!
    echo "$pid" > /run/guestlink-agent.pid
    say "agent started (pid $pid)"
    # `wait` returns early when a trapped signal arrives: keep waiting.
    wait "$pid"
    rc=$?
    while kill -0 "$pid" 2>/dev/null; do wait "$pid"; rc=$?; done
    say "agent exited (status $rc), respawning"
    sleep 0.5
done

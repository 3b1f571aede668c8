#!/bin/sh
# poweroff / reboot / halt / shutdown for the test VM, which has no init system.
# Installed as /sbin/{poweroff,reboot,halt,shutdown} (and /usr/sbin/...).
#
# Mimics a quick real shutdown: stop respawning the agent, let in-flight
# replies drain (0.2 s), SIGTERM the agent (wait up to 1 s), sync, then
# busybox `poweroff -f` / `reboot -f` (the reboot(2) syscall; immediate).
# halt is treated as poweroff so that QEMU exits instead of hanging.
# All arguments except shutdown's -r / --reboot are ignored.

action=poweroff
case "${0##*/}" in
    reboot) action=reboot ;;
esac
for a in "$@"; do
    case "$a" in
        -r|--reboot) [ "${0##*/}" = shutdown ] && action=reboot ;;
    esac
done

touch /run/guestlink-stopping 2>/dev/null
echo "guestlink-testvm: $action" > /dev/console 2>/dev/null
sleep 0.2
if [ -f /run/guestlink-agent.pid ]; then
    pid=$(cat /run/guestlink-agent.pid)
    if [ -n "$pid" ] && [ "$pid" != "$$" ] && kill -TERM "$pid" 2>/dev/null; then
        i=0
        while kill -0 "$pid" 2>/dev/null && [ "$i" -lt 20 ]; do
            sleep 0.05
            i=$((i + 1))
        done
    fi
fi
sync
exec /bin/busybox "$action" -f

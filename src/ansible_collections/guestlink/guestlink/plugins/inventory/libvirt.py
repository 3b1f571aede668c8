"""Ansible inventory plugin ``guestlink.guestlink.libvirt``: libvirt domains with guestlink channels.

The domains and their channels come from :func:`guestlink.libvirt.list_domains` (the same code as
``guestlink list``); this module only turns them into hosts, groups and connection variables.
"""

from __future__ import annotations

DOCUMENTATION = r"""
name: libvirt
short_description: libvirt domains with guestlink channels, on one or more hypervisors
description:
  - Lists the domains of each libvirt URI that have guestlink's control channel, as hosts using the
    C(guestlink.guestlink.guestlink) connection.
  - Each host gets C(ansible_host) (the domain name), C(ansible_guestlink_uri) (its hypervisor),
    C(guestlink_uuid), C(guestlink_state), C(guestlink_hypervisor), C(guestlink_has_data_channel).
  - Groups C(guestlink), C(hypervisor_<label>), C(state_<state>) (other characters than letters,
    digits and _ as _; C(state_running),
    C(state_shut_off), ...), plus the usual C(groups)/C(keyed_groups)/C(compose).
  - A domain name that exists on more than one hypervisor is never merged into one host. With
    O(qualify=auto) each of them is named C(<domain>@<label>); unique names stay plain.
  - The file must be named C(*.guestlink.yml) or C(*.guestlink.yaml) (or C(guestlink.yml)).
author: guestlink developers
version_added: "0.1.0"
requirements:
  - the guestlink Python package; libvirt-python or virsh on the controller
extends_documentation_fragment:
  - constructed
options:
  plugin:
    description: The name of this plugin.
    required: true
    choices: [guestlink.guestlink.libvirt]
  uris:
    description:
      - The hypervisors, as libvirt URIs (strings) or as C({uri, name}) where C(name) is the label
        used in host and group names. Without a name the label is the URI's host, else C(local);
        labels that clash get C(-2), C(-3)... in list order.
      - Default the one of C(GUESTLINK_URI), C(LIBVIRT_DEFAULT_URI), else C(qemu:///system).
    type: list
    elements: raw
  qualify:
    description:
      - C(auto), hostnames are C(<domain>@<label>) only for names found on more than one
        hypervisor; C(always), every hostname is qualified; C(never), a name on two hypervisors
        is an error.
    type: str
    default: auto
    choices: [auto, always, never]
  running_only:
    description: List only running domains.
    type: bool
    default: false
  strict_uris:
    description:
      - Fail when a hypervisor cannot be listed; false, warn and list the others.
    type: bool
    default: false
  ctl_name:
    description: Control channel name to look for (default as recorded per domain, else C(org.guestlink.ctl)).
    type: str
  data_name:
    description: Data channel name (default as recorded per domain, else C(org.guestlink.data)).
    type: str
"""

EXAMPLES = r"""
# fleet.guestlink.yml
plugin: guestlink.guestlink.libvirt
uris:
  - qemu:///system
  - {uri: "qemu+ssh://root@hv2/system", name: hv2}
running_only: true
keyed_groups:
  - key: guestlink_hypervisor
    prefix: hv
compose:
  ansible_python_interpreter: "'/usr/bin/python3'"
"""

import os
import re
import typing as t
from urllib.parse import urlsplit

from ansible.errors import AnsibleParserError
from ansible.plugins.inventory import BaseInventoryPlugin, Constructable
from ansible.utils.display import Display

display = Display()

CONNECTION = "guestlink.guestlink.guestlink"


def _label(uri: str) -> str:
    host = urlsplit(uri).hostname
    return re.sub(r"[^A-Za-z0-9_.-]", "_", host) if host else "local"


def _group(name: str) -> str:
    """A valid group name whatever TRANSFORM_INVALID_GROUP_CHARS says ("shut off" -> shut_off)."""
    return re.sub(r"[^A-Za-z0-9_]", "_", name)


class InventoryModule(BaseInventoryPlugin, Constructable):
    NAME = "guestlink.guestlink.libvirt"

    def verify_file(self, path: str) -> bool:
        if not super().verify_file(path):
            return False
        base = os.path.basename(path)
        return base.endswith((".guestlink.yml", ".guestlink.yaml")) or base in (
            "guestlink.yml", "guestlink.yaml")

    def _hypervisors(self) -> list[tuple[str, str]]:
        """[(uri, label)] from the ``uris`` option, labels made unique."""
        raw = self.get_option("uris") or [os.environ.get("GUESTLINK_URI")
                                          or os.environ.get("LIBVIRT_DEFAULT_URI")
                                          or "qemu:///system"]
        out: list[tuple[str, str]] = []
        seen: dict[str, int] = {}
        for entry in raw:
            if isinstance(entry, str):
                uri, label = entry, _label(entry)
            elif isinstance(entry, dict) and isinstance(entry.get("uri"), str):
                uri = entry["uri"]
                label = str(entry.get("name") or _label(uri))
            else:
                raise AnsibleParserError("guestlink inventory: each of uris is a URI or "
                                         "{uri: ..., name: ...}, not %r" % (entry,))
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", label):
                raise AnsibleParserError("guestlink inventory: hypervisor name %r: use letters, "
                                         "digits, '_', '.', '-'" % label)
            seen[label] = seen.get(label, 0) + 1
            if seen[label] > 1:
                label = "%s-%d" % (label, seen[label])
            out.append((uri, label))
        return out

    def parse(self, inventory: t.Any, loader: t.Any, path: str, cache: bool = True) -> None:
        super().parse(inventory, loader, path, cache)
        self._read_config_data(path)
        try:
            from guestlink.libvirt import LibvirtError, list_domains
        except ImportError as exc:
            raise AnsibleParserError("guestlink inventory needs the guestlink Python package: "
                                     "pip install guestlink[ansible] (%s)" % exc)
        running_only = self.get_option("running_only")
        found: list[tuple[str, str, t.Any]] = []
        for uri, label in self._hypervisors():
            try:
                rows = list_domains(uri, self.get_option("ctl_name"), self.get_option("data_name"))
            except LibvirtError as exc:
                if self.get_option("strict_uris"):
                    raise AnsibleParserError("guestlink inventory: %s: %s" % (uri, exc))
                display.warning("guestlink inventory: skipping %s: %s" % (uri, exc))
                continue
            for row in rows:
                if row.ctl is None or (running_only and row.state != "running"):
                    continue
                found.append((uri, label, row))

        counts: dict[str, int] = {}
        for _, _, row in found:
            counts[row.name] = counts.get(row.name, 0) + 1
        qualify = self.get_option("qualify")
        clashes = sorted(n for n, c in counts.items() if c > 1)
        if clashes and qualify == "never":
            raise AnsibleParserError("guestlink inventory: domains on more than one hypervisor: %s "
                                     "(qualify: never)" % ", ".join(clashes))

        self.inventory.add_group("guestlink")
        strict = self.get_option("strict")
        for uri, label, row in found:
            name = row.name
            if qualify == "always" or counts[name] > 1:
                name = "%s@%s" % (row.name, label)
            host = self.inventory.add_host(name, group="guestlink")
            state_group = self.inventory.add_group(_group("state_" + row.state))
            hv_group = self.inventory.add_group(_group("hypervisor_" + label))
            self.inventory.add_child(state_group, host)
            self.inventory.add_child(hv_group, host)
            hostvars = {
                "ansible_connection": CONNECTION,
                "ansible_host": row.name,
                "ansible_guestlink_uri": uri,
                "guestlink_uuid": row.uuid,
                "guestlink_state": row.state,
                "guestlink_hypervisor": label,
                "guestlink_has_data_channel": row.data is not None,
            }
            if row.names.ctl and self.get_option("ctl_name"):
                hostvars["ansible_guestlink_ctl_name"] = row.names.ctl
            if row.names.data and self.get_option("data_name"):
                hostvars["ansible_guestlink_data_name"] = row.names.data
            for key, value in hostvars.items():
                self.inventory.set_variable(host, key, value)
            self._set_composite_vars(self.get_option("compose"), hostvars, host, strict=strict)
            self._add_host_to_composed_groups(self.get_option("groups"), hostvars, host,
                                              strict=strict)
            self._add_host_to_keyed_groups(self.get_option("keyed_groups"), hostvars, host,
                                           strict=strict)

"""Domain XML built with ElementTree: every value is data, never markup.

A VM description such as ``</name><devices>`` must stay a name, so nothing
here formats strings into XML.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass

DOMAIN_TYPE_BY_HYPERVISOR = {"KVM": "kvm", "QEMU": "qemu", "TEST": "test"}


@dataclass(frozen=True)
class Disk:
    """A storage volume attached to the VM, in attachment order."""

    path: str
    format: str = "raw"


@dataclass(frozen=True)
class DomainSpec:
    name: str
    uuid: str
    memory_kib: int
    vcpus: int
    boot_device: str
    hypervisor_type: str
    arch: str = "x86_64"
    machine: str = "pc"
    emulator: str = "/usr/bin/qemu-system-x86_64"
    vnc_listen: str = "127.0.0.1"
    mac_address: str | None = None
    # libvirt network for the NIC; empty: user-mode networking (works unprivileged)
    network: str = ""
    disks: tuple[Disk, ...] = ()


def domain_xml(spec: DomainSpec) -> str:
    domain_type = DOMAIN_TYPE_BY_HYPERVISOR[spec.hypervisor_type]
    domain = ET.Element("domain", type=domain_type)
    ET.SubElement(domain, "name").text = spec.name
    ET.SubElement(domain, "uuid").text = spec.uuid
    ET.SubElement(domain, "memory", unit="KiB").text = str(spec.memory_kib)
    ET.SubElement(domain, "currentMemory", unit="KiB").text = str(spec.memory_kib)
    ET.SubElement(domain, "vcpu").text = str(spec.vcpus)

    os_el = ET.SubElement(domain, "os")
    os_type = ET.SubElement(os_el, "type")
    os_type.text = "hvm"
    if domain_type != "test":
        os_type.set("arch", spec.arch)
        os_type.set("machine", spec.machine)
    ET.SubElement(os_el, "boot", dev=spec.boot_device)

    features = ET.SubElement(domain, "features")
    ET.SubElement(features, "acpi")
    ET.SubElement(domain, "clock", offset="utc")
    ET.SubElement(domain, "on_poweroff").text = "destroy"
    ET.SubElement(domain, "on_reboot").text = "restart"
    ET.SubElement(domain, "on_crash").text = "destroy"

    devices = ET.SubElement(domain, "devices")
    if domain_type != "test":
        ET.SubElement(devices, "emulator").text = spec.emulator
    for index, disk in enumerate(spec.disks):
        element = ET.SubElement(devices, "disk", type="file", device="disk")
        if domain_type != "test":
            ET.SubElement(element, "driver", name="qemu", type=disk.format)
        ET.SubElement(element, "source", file=disk.path)
        ET.SubElement(element, "target", dev=_disk_target(index), bus="virtio")
    if spec.mac_address:
        if spec.network:
            nic = ET.SubElement(devices, "interface", type="network")
            ET.SubElement(nic, "source", network=spec.network)
        else:
            nic = ET.SubElement(devices, "interface", type="user")
        ET.SubElement(nic, "mac", address=spec.mac_address)
        if domain_type != "test":
            ET.SubElement(nic, "model", type="virtio")
    ET.SubElement(devices, "graphics", type="vnc", port="-1", autoport="yes", listen=spec.vnc_listen)
    return ET.tostring(domain, encoding="unicode")


def _disk_target(index: int) -> str:
    """vda, vdb, ... vdz, vdaa, ... (the guest-visible device names)."""
    name = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        name = chr(ord("a") + rest) + name
    return "vd" + name


def vnc_port(xml_desc: str) -> int | None:
    """The VNC port of a running domain's live XML (None if none was allocated)."""
    root = ET.fromstring(xml_desc)
    for graphics in root.iter("graphics"):
        if graphics.get("type") == "vnc":
            port = graphics.get("port")
            if port and port.lstrip("-").isdigit() and int(port) > 0:
                return int(port)
    return None

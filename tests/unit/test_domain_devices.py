"""Disks and NICs in the domain XML: built by ElementTree, paths stay data."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from taskomatic.actions.domain_xml import Disk, DomainSpec, _disk_target, domain_xml


def spec(**kw: object) -> DomainSpec:
    base: dict[str, object] = {"name": "vm", "uuid": "6a1c2f9e-0000-4000-8000-000000000001", "memory_kib": 65536,
                               "vcpus": 1, "boot_device": "hd", "hypervisor_type": "QEMU"}
    base.update(kw)
    return DomainSpec(**base)  # type: ignore[arg-type]


def test_disks_in_order_with_virtio_targets_and_format() -> None:
    root = ET.fromstring(domain_xml(spec(disks=(Disk("/pool/a.img"), Disk("/pool/b.qcow2", "qcow2")))))
    disks = root.findall("devices/disk")
    assert [d.find("source").get("file") for d in disks] == ["/pool/a.img", "/pool/b.qcow2"]
    assert [d.find("target").get("dev") for d in disks] == ["vda", "vdb"]
    assert [d.find("driver").get("type") for d in disks] == ["raw", "qcow2"]


def test_a_hostile_disk_path_stays_an_attribute_value() -> None:
    path = "/pool/x'/><disk type='block'><source dev='/dev/sda'/>"
    root = ET.fromstring(domain_xml(spec(disks=(Disk(path),))))
    disks = root.findall("devices/disk")
    assert len(disks) == 1 and disks[0].find("source").get("file") == path


def test_nic_user_mode_by_default_and_network_when_configured() -> None:
    user = ET.fromstring(domain_xml(spec(mac_address="52:54:00:12:34:56"))).find("devices/interface")
    assert user.get("type") == "user" and user.find("mac").get("address") == "52:54:00:12:34:56"
    net = ET.fromstring(domain_xml(spec(mac_address="52:54:00:12:34:56", network="default"))).find(
        "devices/interface")
    assert net.get("type") == "network" and net.find("source").get("network") == "default"
    assert ET.fromstring(domain_xml(spec())).find("devices/interface") is None


def test_disk_target_names() -> None:
    assert [_disk_target(i) for i in (0, 1, 25, 26, 27)] == ["vda", "vdb", "vdz", "vdaa", "vdab"]

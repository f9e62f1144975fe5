"""Domain XML is built by an XML library: a VM description is data, never markup."""

from __future__ import annotations

import uuid
import xml.etree.ElementTree as ET

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from taskomatic.actions.domain_xml import DOMAIN_TYPE_BY_HYPERVISOR, DomainSpec, domain_xml, vnc_port
from taskomatic.actions.vm_state import domain_name

UUID = "6f1c3c4e-9d1b-4a8e-9f53-0d5a8e2b7c11"
HOSTILE = [
    "</name><devices><disk/>",
    "a&b<'\">",
    "</name></domain><domain type='kvm'><name>evil",
    "<![CDATA[x]]>",
    "]]>",
    "&amp; &lt;",
    "<!-- -->",
    "<?xml version='1.0'?>",
    "name\"with'quotes",
]
TOP_LEVEL = ["name", "uuid", "memory", "currentMemory", "vcpu", "os", "features", "clock",
             "on_poweroff", "on_reboot", "on_crash", "devices"]


def spec(**changes: object) -> DomainSpec:
    values: dict[str, object] = dict(name="vm1", uuid=UUID, memory_kib=65536, vcpus=1, boot_device="hd",
                                      hypervisor_type="QEMU")
    values.update(changes)
    return DomainSpec(**values)  # type: ignore[arg-type]


def parse(s: DomainSpec) -> ET.Element:
    return ET.fromstring(domain_xml(s))


def assert_clean_structure(root: ET.Element, name: str) -> None:
    assert root.tag == "domain"
    assert [child.tag for child in root] == TOP_LEVEL
    names = root.findall(".//name")
    assert len(names) == 1
    assert names[0].text == name
    assert list(names[0]) == []  # no elements inside <name>
    assert len(root.findall(".//devices")) == 1
    assert root.findall(".//disk") == []
    assert len(root.findall(".//domain")) == 0  # no nested domain
    assert root.findtext("uuid") == UUID


@pytest.mark.parametrize("name", HOSTILE)
@pytest.mark.parametrize("hypervisor", ["KVM", "QEMU", "TEST"])
def test_hostile_name_stays_text(name: str, hypervisor: str) -> None:
    root = parse(spec(name=name, hypervisor_type=hypervisor))
    assert_clean_structure(root, name)


@pytest.mark.parametrize("description", HOSTILE)
def test_hostile_description_through_domain_name(description: str) -> None:
    name = domain_name(description)
    assert_clean_structure(parse(spec(name=name)), name)


def test_hostile_text_in_other_values_stays_data() -> None:
    root = parse(spec(emulator="/bin/q'><disk/>", vnc_listen="1.2.3.4\"/><disk/>",
                      machine="pc'/><x/>", mac_address="52:54:00:00:00:01\"/><disk/>"))
    assert root.findall(".//disk") == []
    assert root.findall(".//x") == []
    assert root.findtext("devices/emulator") == "/bin/q'><disk/>"
    assert root.find("devices/graphics").get("listen") == "1.2.3.4\"/><disk/>"  # type: ignore[union-attr]
    assert root.find("os/type").get("machine") == "pc'/><x/>"  # type: ignore[union-attr]
    assert root.find("devices/interface/mac").get("address") == "52:54:00:00:00:01\"/><disk/>"  # type: ignore[union-attr]


@pytest.mark.parametrize("hypervisor, domain_type", [("KVM", "kvm"), ("QEMU", "qemu"), ("TEST", "test")])
def test_domain_type_per_hypervisor(hypervisor: str, domain_type: str) -> None:
    assert parse(spec(hypervisor_type=hypervisor)).get("type") == domain_type


def test_hypervisor_table() -> None:
    assert DOMAIN_TYPE_BY_HYPERVISOR == {"KVM": "kvm", "QEMU": "qemu", "TEST": "test"}


def test_unknown_hypervisor_is_refused() -> None:
    with pytest.raises(KeyError):
        domain_xml(spec(hypervisor_type="XEN"))


@pytest.mark.parametrize("hypervisor", ["KVM", "QEMU"])
def test_emulated_domains_name_emulator_arch_and_machine(hypervisor: str) -> None:
    root = parse(spec(hypervisor_type=hypervisor, emulator="/usr/libexec/qemu-kvm", arch="aarch64",
                      machine="virt"))
    assert root.findtext("devices/emulator") == "/usr/libexec/qemu-kvm"
    os_type = root.find("os/type")
    assert os_type is not None
    assert os_type.text == "hvm"
    assert (os_type.get("arch"), os_type.get("machine")) == ("aarch64", "virt")


def test_test_domain_has_no_emulator_or_machine() -> None:
    root = parse(spec(hypervisor_type="TEST"))
    assert root.find("devices/emulator") is None
    os_type = root.find("os/type")
    assert os_type is not None and os_type.text == "hvm"
    assert os_type.get("machine") is None and os_type.get("arch") is None


@pytest.mark.parametrize("memory, vcpus", [(65536, 1), (4194304, 8), (1, 64)])
def test_memory_and_vcpu_values(memory: int, vcpus: int) -> None:
    root = parse(spec(memory_kib=memory, vcpus=vcpus))
    for tag in ("memory", "currentMemory"):
        element = root.find(tag)
        assert element is not None
        assert element.text == str(memory)
        assert element.get("unit") == "KiB"
    assert root.findtext("vcpu") == str(vcpus)


@pytest.mark.parametrize("boot", ["hd", "network", "cdrom"])
def test_boot_device(boot: str) -> None:
    boots = parse(spec(boot_device=boot)).findall("os/boot")
    assert len(boots) == 1
    assert boots[0].get("dev") == boot


def test_vnc_graphics_autoport_on_configured_address() -> None:
    graphics = parse(spec(vnc_listen="0.0.0.0")).findall("devices/graphics")
    assert len(graphics) == 1
    assert graphics[0].attrib == {"type": "vnc", "port": "-1", "autoport": "yes", "listen": "0.0.0.0"}


def test_mac_address_makes_one_nic() -> None:
    assert parse(spec()).findall("devices/interface") == []
    nics = parse(spec(mac_address="52:54:00:aa:bb:cc")).findall("devices/interface")
    assert len(nics) == 1
    mac = nics[0].find("mac")
    assert mac is not None and mac.get("address") == "52:54:00:aa:bb:cc"


def test_lifecycle_elements() -> None:
    root = parse(spec())
    assert root.findtext("on_poweroff") == "destroy"
    assert root.findtext("on_reboot") == "restart"
    assert root.findtext("on_crash") == "destroy"


def test_libvirt_test_driver_accepts_hostile_names() -> None:
    libvirt = pytest.importorskip("libvirt")
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    conn = libvirt.open("test:///default")
    try:
        for description in [*HOSTILE, "a&b<'\">"]:
            name = domain_name(description)
            dom = conn.defineXML(domain_xml(spec(name=name, uuid=str(uuid.uuid4()), hypervisor_type="TEST",
                                                 memory_kib=131072, vcpus=2)))
            try:
                assert dom.name() == name
                assert dom.maxMemory() == 131072
                live = ET.fromstring(dom.XMLDesc(0))
                assert live.findtext("name") == name
                assert live.findall(".//disk") == []
                assert vnc_port(dom.XMLDesc(0)) is None  # defined, not running: no port yet
            finally:
                dom.undefine()
    finally:
        conn.close()


# -- vnc_port --------------------------------------------------------------------


def _live(graphics: str) -> str:
    return f"<domain type='kvm'><name>x</name><devices>{graphics}</devices></domain>"


@pytest.mark.parametrize("graphics, port", [
    ("<graphics type='vnc' port='5900' autoport='yes'/>", 5900),
    ("<graphics type='vnc' port='5931'/>", 5931),
    ("<graphics type='vnc' port='-1' autoport='yes'/>", None),
    ("<graphics type='vnc' port='0'/>", None),
    ("<graphics type='vnc' autoport='yes'/>", None),
    ("<graphics type='vnc' port=''/>", None),
    ("<graphics type='vnc' port='abc'/>", None),
    ("<graphics type='spice' port='5900'/>", None),
    ("<graphics type='spice' port='5901'/><graphics type='vnc' port='5902'/>", 5902),
    ("", None),
])
def test_vnc_port(graphics: str, port: int | None) -> None:
    assert vnc_port(_live(graphics)) == port


def test_vnc_port_of_generated_xml_is_none() -> None:
    assert vnc_port(domain_xml(spec())) is None


def test_vnc_port_rejects_malformed_xml() -> None:
    with pytest.raises(ET.ParseError):
        vnc_port("<domain><devices>")


# -- domain_name -----------------------------------------------------------------


@pytest.mark.parametrize("description, name", [
    ("web01", "web01"),
    ("a/b/c", "a_b_c"),
    ("</name><devices><disk/>", "<_name><devices><disk_>"),
    ("a&b<'\">", "a&b<'\">"),
    ("tab\there", "tab here"),
    ("new\nline\r", "new line"),
    ("nul\x00bell\x07del\x7f", "nul bell del"),
    ("  padded  ", "padded"),
    ("ünïcödé 名前", "ünïcödé 名前"),
    ("", "vm"),
    ("   ", "vm"),
    ("\n\x01\t", "vm"),
])
def test_domain_name(description: str, name: str) -> None:
    assert domain_name(description) == name


@given(st.text())
@settings(max_examples=200, derandomize=True)
def test_domain_name_never_has_slash_or_control_chars(description: str) -> None:
    name = domain_name(description)
    assert name
    assert "/" not in name
    assert not any(ord(ch) < 32 or ord(ch) == 127 for ch in name)
    assert name == name.strip()


@given(st.text(alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\x00\ufffe\uffff")))
@settings(max_examples=200, derandomize=True)
def test_any_description_gives_well_formed_xml_with_that_name(description: str) -> None:
    name = domain_name(description)
    root = ET.fromstring(domain_xml(spec(name=name)))
    assert [el.text for el in root.iter("name")] == [name]


@pytest.mark.parametrize("description", ["vm\ufffe", "vm\uffff"])
def test_xml_illegal_noncharacters_do_not_break_the_document(description: str) -> None:
    name = domain_name(description)
    root = ET.fromstring(domain_xml(spec(name=name)))
    assert root.findtext("name") == name

"""Pool and volume XML is built by an XML library: names and paths are data, never markup."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from taskomatic.actions.pool_xml import (
    MAX_VOLUME_KB,
    PoolSpec,
    identity_differences,
    name_problem,
    pool_identity,
    pool_xml,
    size_problem,
    volume_format,
    volume_xml,
)

HOSTILE = [
    "</name><target><path>/etc</path></target>",
    "a&b<'\">",
    "</name></pool><pool type='dir'><name>evil",
    "<![CDATA[x]]>",
    "]]>",
    "&amp; &lt;",
    "<!-- -->",
    "<?xml version='1.0'?>",
    "name\"with'quotes",
    "<name>evil<",
    "&lt;&gt;&#0;",
    "x'><target><path>",
]


def parse(xml: str) -> ET.Element:
    return ET.fromstring(xml)


# -- pool XML per type ------------------------------------------------------------------
def test_dir_pool() -> None:
    root = parse(pool_xml(PoolSpec("images", "dir", target_path="/var/lib/images")))
    assert root.tag == "pool" and root.get("type") == "dir"
    assert [child.tag for child in root] == ["name", "target"]
    assert root.findtext("name") == "images"
    assert root.findtext("target/path") == "/var/lib/images"


def test_dir_pool_with_uuid() -> None:
    uuid = "6f1c3c4e-9d1b-4a8e-9f53-0d5a8e2b7c11"
    root = parse(pool_xml(PoolSpec("images", "dir", target_path="/srv"), uuid=uuid))
    assert [child.tag for child in root] == ["name", "uuid", "target"]
    assert root.findtext("uuid") == uuid


def test_netfs_pool() -> None:
    root = parse(pool_xml(PoolSpec("nfs1", "netfs", source_host="filer.example.com",
                                   source_path="/export/vms", target_path="/mnt/nfs1")))
    assert root.get("type") == "netfs"
    assert [child.tag for child in root] == ["name", "source", "target"]
    source = root.find("source")
    assert source is not None
    assert [child.tag for child in source] == ["host", "dir", "format"]
    assert source.find("host").attrib == {"name": "filer.example.com"}  # type: ignore[union-attr]
    assert source.find("dir").get("path") == "/export/vms"  # type: ignore[union-attr]
    assert source.find("format").get("type") == "nfs"  # type: ignore[union-attr]
    assert root.findtext("target/path") == "/mnt/nfs1"


def test_netfs_port_is_split_off() -> None:
    root = parse(pool_xml(PoolSpec("nfs1", "netfs", source_host="filer:2049", source_path="/e",
                                   target_path="/mnt/x")))
    assert root.find("source/host").attrib == {"name": "filer", "port": "2049"}  # type: ignore[union-attr]


def test_ipv6_source_host_is_kept_whole() -> None:
    root = parse(pool_xml(PoolSpec("nfs1", "netfs", source_host="fe80::1", source_path="/e",
                                   target_path="/mnt/x")))
    assert root.find("source/host").attrib == {"name": "fe80::1"}  # type: ignore[union-attr]


def test_iscsi_pool() -> None:
    iqn = "iqn.2008-01.com.example:storage.disk1"
    root = parse(pool_xml(PoolSpec("san1", "iscsi", source_host="192.0.2.10:3260", source_path=iqn)))
    assert root.get("type") == "iscsi"
    source = root.find("source")
    assert source is not None
    assert [child.tag for child in source] == ["host", "device"]
    assert source.find("host").attrib == {"name": "192.0.2.10", "port": "3260"}  # type: ignore[union-attr]
    assert source.find("device").get("path") == iqn  # type: ignore[union-attr]
    assert root.findtext("target/path") == "/dev/disk/by-path"  # the default


def test_logical_pool() -> None:
    root = parse(pool_xml(PoolSpec("lvm1", "logical", source_path="vg_guests")))
    assert root.get("type") == "logical"
    source = root.find("source")
    assert source is not None
    assert [child.tag for child in source] == ["name", "format"]
    assert source.findtext("name") == "vg_guests"
    assert source.find("format").get("type") == "lvm2"  # type: ignore[union-attr]
    assert root.findtext("target/path") == "/dev/vg_guests"


def test_from_row_treats_empty_strings_as_missing() -> None:
    spec = PoolSpec.from_row({"name": "p", "pool_type": "iscsi", "source_host": "h", "source_path": "iqn.x",
                              "target_path": ""})
    assert parse(pool_xml(spec)).findtext("target/path") == "/dev/disk/by-path"


# -- what a pool spec must have ---------------------------------------------------------
@pytest.mark.parametrize(("spec", "expected"), [
    (PoolSpec("p", "dir"), "dir pools need target_path"),
    (PoolSpec("p", "dir", target_path="relative/dir"), "must be an absolute path"),
    (PoolSpec("p", "netfs", source_path="/e", target_path="/m"), "netfs pools need source_host"),
    (PoolSpec("p", "netfs", source_host="h", target_path="/m"), "netfs pools need source_path"),
    (PoolSpec("p", "iscsi", source_host="h"), "iscsi pools need source_path"),
    (PoolSpec("p", "logical"), "logical pools need source_path"),
    (PoolSpec("p", "logical", source_path="../vg"), "volume group name"),
    (PoolSpec("p", "zfs", target_path="/x"), "pool type 'zfs' is not one of dir, netfs, iscsi, logical"),
    (PoolSpec("", "dir", target_path="/x"), "pool name is empty"),
    (PoolSpec("a/b", "dir", target_path="/x"), "must not contain '/'"),
    (PoolSpec("bell\x07", "dir", target_path="/x"), "control character"),
    (PoolSpec("p", "dir", target_path="/x\x01y"), "control character"),
])
def test_bad_specs_are_refused_with_the_reason(spec: PoolSpec, expected: str) -> None:
    with pytest.raises(ValueError) as raised:
        pool_xml(spec)
    assert expected in str(raised.value)


def test_every_problem_is_reported_at_once() -> None:
    problems = PoolSpec("", "netfs").problems()
    assert len(problems) == 4  # name, source_host, source_path, target_path


# -- hostile names and paths stay data --------------------------------------------------
@pytest.mark.parametrize("name", [n for n in HOSTILE if "/" not in n])
def test_hostile_pool_name_stays_a_name(name: str) -> None:
    root = parse(pool_xml(PoolSpec(name, "dir", target_path="/srv/pool")))
    assert [child.tag for child in root] == ["name", "target"]
    assert root.findtext("name") == name
    assert root.findtext("target/path") == "/srv/pool"


@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_source_fields_stay_data(text: str) -> None:
    root = parse(pool_xml(PoolSpec("p", "netfs", source_host=text, source_path="/" + text,
                                   target_path="/mnt/" + text)))
    assert [child.tag for child in root] == ["name", "source", "target"]
    assert root.find("source/host").get("name") == text  # type: ignore[union-attr]
    assert root.find("source/dir").get("path") == "/" + text  # type: ignore[union-attr]
    assert root.findtext("target/path") == "/mnt/" + text


@pytest.mark.parametrize("name", [n for n in HOSTILE if "/" not in n])
def test_hostile_volume_name_stays_a_name(name: str) -> None:
    root = parse(volume_xml(name, 1024))
    assert [child.tag for child in root] == ["name", "capacity", "allocation", "target"]
    assert root.findtext("name") == name


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=1, max_size=80))
def test_any_acceptable_name_round_trips(name: str) -> None:
    if name_problem(name) is not None:
        return
    assert parse(pool_xml(PoolSpec(name, "dir", target_path="/srv/p"))).findtext("name") == name
    assert parse(volume_xml(name, 1)).findtext("name") == name


# -- volume XML -------------------------------------------------------------------------
def test_volume_is_sparse_with_capacity_in_kib() -> None:
    root = parse(volume_xml("disk1.img", 10240))
    assert root.tag == "volume"
    capacity, allocation = root.find("capacity"), root.find("allocation")
    assert capacity is not None and allocation is not None
    assert (capacity.get("unit"), capacity.text) == ("KiB", "10240")
    assert (allocation.get("unit"), allocation.text) == ("KiB", "0")
    assert root.find("target/format").get("type") == "raw"  # type: ignore[union-attr]


def test_largest_volume_is_accepted() -> None:
    assert parse(volume_xml("big", MAX_VOLUME_KB)).findtext("capacity") == str(MAX_VOLUME_KB)


def test_only_creatable_formats() -> None:
    with pytest.raises(ValueError, match="format 'qcow2' cannot be created"):
        volume_xml("d", 1, "qcow2")


@pytest.mark.parametrize(("name", "expected"), [
    ("", "is empty"),
    ("a/b", "must not contain '/'"),
    ("../x", "must not contain '/'"),
    (".", "is not allowed"),
    ("..", "is not allowed"),
    ("..hidden", "must not start with '..'"),
    ("nul\0byte", "NUL"),
    ("x" * 300, "300 bytes long"),
    ("é" * 128, "256 bytes long"),  # bytes, not characters, count
    ("tab\there", "control character"),
    ("cr\r", "control character"),
    ("del\x7f", "control character"),
    ("\ud800", "XML cannot hold"),
])
def test_bad_volume_names(name: str, expected: str) -> None:
    problem = name_problem(name, "volume name")
    assert problem is not None and expected in problem
    with pytest.raises(ValueError, match="volume name"):
        volume_xml(name, 1)


@pytest.mark.parametrize("name", ["disk1.img", "a..b", ".hidden", "x" * 255, "é" * 127, "with space", "ü<&>"])
def test_good_volume_names(name: str) -> None:
    assert name_problem(name) is None


@pytest.mark.parametrize(("size", "expected"), [
    (0, "greater than 0"),
    (-1, "greater than 0"),
    (MAX_VOLUME_KB + 1, "larger than the maximum"),
    (10**30, "larger than the maximum"),
    (True, "whole number"),
    (1.5, "whole number"),
    ("10", "whole number"),
    (None, "whole number"),
])
def test_bad_sizes(size: object, expected: str) -> None:
    problem = size_problem(size)
    assert problem is not None and expected in problem
    with pytest.raises(ValueError, match=expected):
        volume_xml("d", size)  # type: ignore[arg-type]


def test_volume_format_is_read_back() -> None:
    assert volume_format(volume_xml("d", 1)) == "raw"
    assert volume_format("<volume><name>d</name></volume>") is None
    assert volume_format("not xml") is None


# -- comparing an existing definition ---------------------------------------------------
def test_identity_ignores_uuid_sizes_and_trailing_slashes() -> None:
    wanted = pool_xml(PoolSpec("p", "dir", target_path="/srv/pool/"))
    found = ("<pool type='dir'><name>p</name><uuid>6f1c3c4e-9d1b-4a8e-9f53-0d5a8e2b7c11</uuid>"
             "<capacity unit='bytes'>1</capacity><source></source>"
             "<target><path>/srv/pool</path><permissions><mode>0755</mode></permissions></target></pool>")
    assert identity_differences(wanted, found) == []
    assert pool_identity(found)["target_path"] == "/srv/pool"


def test_identity_names_what_differs() -> None:
    wanted = pool_xml(PoolSpec("p", "dir", target_path="/srv/a"))
    found = pool_xml(PoolSpec("p", "dir", target_path="/srv/b"))
    assert identity_differences(wanted, found) == ["target path '/srv/b' (the row says '/srv/a')"]
    other_type = pool_xml(PoolSpec("p", "netfs", source_host="h", source_path="/e", target_path="/srv/a"))
    differences = identity_differences(wanted, other_type)
    assert differences[0] == "type 'netfs' (the row says 'dir')"


def test_identity_tolerates_a_default_port() -> None:
    wanted = pool_xml(PoolSpec("s", "iscsi", source_host="h", source_path="iqn.x"))
    found = pool_xml(PoolSpec("s", "iscsi", source_host="h:3260", source_path="iqn.x"))
    assert identity_differences(wanted, found) == []

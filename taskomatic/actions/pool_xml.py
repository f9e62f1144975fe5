"""Storage pool and volume XML built with ElementTree: every value is data.

A pool named ``</name><target>`` or a volume named ``a&b<c>`` must stay a
name, so nothing here formats strings into XML. What XML 1.0 cannot carry
at all (control characters, lone surrogates) is refused with a message
instead of being emitted into a document libvirt would reject.

Pool types and what the row's source fields mean (``storage_pools``):

- ``dir``: target_path is the directory.
- ``netfs``: source_host is the NFS server (``host[:port]``), source_path the
  exported directory, target_path the mount point.
- ``iscsi``: source_host is the portal (``host[:port]``), source_path the
  target IQN; target_path defaults to /dev/disk/by-path.
- ``logical``: source_path is an existing volume group; target_path defaults
  to /dev/<vg>.
"""

from __future__ import annotations

import os.path
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any

POOL_TYPES = ("dir", "netfs", "iscsi", "logical")
# Pools whose storage lives on one host: they cannot move to another host.
LOCAL_POOL_TYPES = frozenset({"dir", "logical"})
# Pool types whose "build" only creates the target directory (safe to repeat);
# for logical it would run vgcreate on the source devices, and iscsi has none.
BUILDABLE_POOL_TYPES = frozenset({"dir", "netfs"})

# Volume formats create_volume can make: raw needs nothing on the node, qcow2
# would need qemu-img there.
CREATABLE_FORMATS = ("raw",)
MAX_NAME_BYTES = 255  # a file name on every Linux file system
MAX_VOLUME_KB = 64 * 1024 * 1024 * 1024  # 64 TiB in KB


def _xml_problem(text: str) -> str | None:
    """Why ``text`` cannot appear in an XML 1.0 document (None if it can)."""
    for ch in text:
        code = ord(ch)
        if code < 32:  # even tab and newline: XML parsers rewrite them in attributes and \r in text
            return f"contains the control character {ch!r}"
        if code == 127:
            return "contains the control character '\\x7f'"
        if 0xD800 <= code <= 0xDFFF or code in (0xFFFE, 0xFFFF):
            return f"contains the character {ch!r}, which XML cannot hold"
    return None


def name_problem(name: object, what: str = "name") -> str | None:
    """Why ``name`` cannot be a libvirt pool or volume name (None if it can).

    Both become file names on the node (a pool's config file, a dir pool's
    volume file), so the file name rules apply: no '/', no NUL, not '.' or
    '..', at most 255 bytes. Control characters are refused as well (libvirt
    cannot read them back from XML).
    """
    if not isinstance(name, str):
        return f"{what} must be text, got {type(name).__name__}"
    if not name:
        return f"{what} is empty"
    if "\0" in name:
        return f"{what} {name!r} contains a NUL character"
    if "/" in name:
        return f"{what} {name!r} must not contain '/'"
    if name in (".", ".."):
        return f"{what} {name!r} is not allowed ('.' and '..' name directories)"
    if name.startswith(".."):
        return f"{what} {name!r} must not start with '..'"
    problem = _xml_problem(name)
    if problem:
        return f"{what} {name!r} {problem}"
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        return f"{what} {name!r} is not valid Unicode text"
    if size > MAX_NAME_BYTES:
        return f"{what} is {size} bytes long, longer than the {MAX_NAME_BYTES} a file name may be"
    return None


def size_problem(size_kb: object) -> str | None:
    """Why ``size_kb`` cannot be a new volume's size in KB (None if it can)."""
    if isinstance(size_kb, bool) or not isinstance(size_kb, int):
        return f"size must be a whole number of KB, got {size_kb!r}"
    if size_kb <= 0:
        return f"size must be greater than 0 KB, got {size_kb}"
    if size_kb > MAX_VOLUME_KB:
        return f"size {size_kb} KB is larger than the maximum of {MAX_VOLUME_KB} KB (64 TiB)"
    return None


def _path_problem(path: str, what: str) -> str | None:
    if not path.startswith("/"):
        return f"{what} {path!r} must be an absolute path"
    if "\0" in path:
        return f"{what} {path!r} contains a NUL character"
    problem = _xml_problem(path)
    return f"{what} {path!r} {problem}" if problem else None


@dataclass(frozen=True)
class PoolSpec:
    """What a pool definition is made of: a ``storage_pools`` row, checked."""

    name: str
    pool_type: str
    source_host: str | None = None
    source_path: str | None = None
    target_path: str | None = None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> PoolSpec:
        return cls(name=row["name"], pool_type=row["pool_type"], source_host=row.get("source_host") or None,
                   source_path=row.get("source_path") or None, target_path=row.get("target_path") or None)

    def problems(self) -> list[str]:
        """Everything wrong with this spec, for one message."""
        found: list[str] = []
        problem = name_problem(self.name, "pool name")
        if problem:
            found.append(problem)
        if self.pool_type not in POOL_TYPES:
            found.append(f"pool type {self.pool_type!r} is not one of {', '.join(POOL_TYPES)}")
            return found
        needs = {
            "dir": ("target_path",),
            "netfs": ("source_host", "source_path", "target_path"),
            "iscsi": ("source_host", "source_path"),
            "logical": ("source_path",),
        }[self.pool_type]
        for column in needs:
            if not getattr(self, column):
                found.append(f"{self.pool_type} pools need {column}")
        for column in ("source_host", "source_path", "target_path"):
            value = getattr(self, column)
            if not value:
                continue
            if column == "target_path" or (column == "source_path" and self.pool_type == "netfs"):
                problem = _path_problem(value, column)
            else:
                problem = _xml_problem(value)
                problem = f"{column} {value!r} {problem}" if problem else None
            if problem:
                found.append(problem)
        if self.pool_type == "logical" and self.source_path:
            problem = name_problem(self.source_path, "volume group name (source_path)")
            if problem:
                found.append(problem)
        return found

    def effective_target(self) -> str:
        """The target path libvirt will use (iscsi and logical have defaults)."""
        if self.target_path:
            return self.target_path
        if self.pool_type == "iscsi":
            return "/dev/disk/by-path"
        if self.pool_type == "logical" and self.source_path:
            return f"/dev/{self.source_path}"
        return ""


def _split_host(source_host: str) -> tuple[str, str | None]:
    """``host:port`` -> (host, port); a bare host or an IPv6 address is kept whole."""
    host, sep, port = source_host.rpartition(":")
    if sep and host and port.isdigit() and ":" not in host:
        return host, port
    return source_host, None


def pool_xml(spec: PoolSpec, uuid: str | None = None) -> str:
    """The pool definition; raises ValueError listing what is wrong with the spec."""
    problems = spec.problems()
    if problems:
        raise ValueError("; ".join(problems))
    pool = ET.Element("pool", type=spec.pool_type)
    ET.SubElement(pool, "name").text = spec.name
    if uuid:
        ET.SubElement(pool, "uuid").text = uuid
    if spec.pool_type != "dir":
        source = ET.SubElement(pool, "source")
        if spec.pool_type in ("netfs", "iscsi"):
            assert spec.source_host is not None and spec.source_path is not None  # checked in problems()
            host_name, port = _split_host(spec.source_host)
            host = ET.SubElement(source, "host", name=host_name)
            if port:
                host.set("port", port)
            if spec.pool_type == "netfs":
                ET.SubElement(source, "dir", path=spec.source_path)
                ET.SubElement(source, "format", type="nfs")
            else:
                ET.SubElement(source, "device", path=spec.source_path)
        else:  # logical: an existing volume group
            ET.SubElement(source, "name").text = spec.source_path
            ET.SubElement(source, "format", type="lvm2")
    target = ET.SubElement(pool, "target")
    ET.SubElement(target, "path").text = spec.effective_target()
    return ET.tostring(pool, encoding="unicode")


def _norm_path(path: str | None) -> str | None:
    return os.path.normpath(path) if path else None


def pool_identity(xml_desc: str) -> dict[str, Any]:
    """What makes two pool definitions the same storage (ignores uuid, sizes, permissions)."""
    root = ET.fromstring(xml_desc)
    source = root.find("source")
    hosts: list[tuple[str | None, str | None]] = []
    dirs: list[str | None] = []
    devices: list[str | None] = []
    source_name = None
    if source is not None:
        hosts = [(h.get("name"), h.get("port")) for h in source.findall("host")]
        dirs = [_norm_path(d.get("path")) for d in source.findall("dir")]
        devices = [d.get("path") for d in source.findall("device")]
        source_name = source.findtext("name")
    return {
        "type": root.get("type"),
        "source_hosts": hosts,
        "source_dirs": dirs,
        "source_devices": devices,
        "source_name": source_name or None,
        "target_path": _norm_path(root.findtext("target/path")),
    }


def identity_differences(wanted_xml: str, found_xml: str) -> list[str]:
    """How an existing pool definition differs from the one we want (empty: same storage)."""
    wanted, found = pool_identity(wanted_xml), pool_identity(found_xml)
    labels = {"type": "type", "source_hosts": "source host", "source_dirs": "source directory",
              "source_devices": "source device", "source_name": "source name", "target_path": "target path"}
    differences = []
    for key, label in labels.items():
        if key == "source_hosts":
            # libvirt may add a default port; compare host names only unless both give one.
            same = [h for h, _ in wanted[key]] == [h for h, _ in found[key]] and all(
                a[1] is None or b[1] is None or a[1] == b[1] for a, b in zip(wanted[key], found[key], strict=False))
        else:
            same = wanted[key] == found[key]
        if not same:
            differences.append(f"{label} {_show(found[key])} (the row says {_show(wanted[key])})")
    return differences


def _show(value: Any) -> str:
    if isinstance(value, list):
        if not value:
            return "none"
        return ", ".join(repr(v[0] if isinstance(v, tuple) else v) for v in value)
    return repr(value) if value is not None else "none"


def volume_xml(name: str, size_kb: int, fmt: str = "raw") -> str:
    """A sparse volume: ``size_kb`` KiB of capacity, nothing allocated up front."""
    problem = name_problem(name, "volume name") or size_problem(size_kb)
    if problem:
        raise ValueError(problem)
    if fmt not in CREATABLE_FORMATS:
        raise ValueError(f"format {fmt!r} cannot be created (supported: {', '.join(CREATABLE_FORMATS)})")
    volume = ET.Element("volume")
    ET.SubElement(volume, "name").text = name
    ET.SubElement(volume, "capacity", unit="KiB").text = str(size_kb)
    ET.SubElement(volume, "allocation", unit="KiB").text = "0"
    target = ET.SubElement(volume, "target")
    ET.SubElement(target, "format", type=fmt)
    return ET.tostring(volume, encoding="unicode")


def volume_format(xml_desc: str) -> str | None:
    """The format libvirt reports for a volume (raw, qcow2, dir, iso...), if any."""
    try:
        root = ET.fromstring(xml_desc)
    except ET.ParseError:
        return None
    fmt = root.find("target/format")
    return fmt.get("type") if fmt is not None else None

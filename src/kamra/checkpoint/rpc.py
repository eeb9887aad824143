"""The protobuf (proto2) wire format of CRIU's RPC, for the messages kamra uses.

Hand-written so that kamra needs neither protoc nor the ``protobuf`` runtime (their
versions skew between distributions and PyPI). The schema below mirrors CRIU 4.2.1's
``images/rpc.proto``: the field numbers are the contract, the names are ours to pick
and follow the .proto. Messages are plain dicts: repeated fields are lists, nested
messages are dicts, enums are ints (see the name tables).
"""

from __future__ import annotations

from typing import Any

# message -> field -> (number, kind, repeated); kind is a scalar or a message name.
Field = tuple[int, str, bool]
_SCALARS = frozenset({"int32", "uint32", "bool", "string", "enum"})


def _fields(*specs: tuple[Any, ...]) -> dict[str, Field]:
    """(name, number, kind[, repeated]) tuples as a message's field table."""
    return {name: (number, kind, bool(rest and rest[0])) for name, number, kind, *rest in specs}


SCHEMA: dict[str, dict[str, Field]] = {
    "criu_page_server_info": _fields(
        ("address", 1, "string"), ("port", 2, "int32"), ("pid", 3, "int32"), ("fd", 4, "int32")),
    "criu_veth_pair": _fields(("if_in", 1, "string"), ("if_out", 2, "string")),
    "ext_mount_map": _fields(("key", 1, "string"), ("val", 2, "string")),
    "join_namespace": _fields(
        ("ns", 1, "string"), ("ns_file", 2, "string"), ("extra_opt", 3, "string")),
    "inherit_fd": _fields(("key", 1, "string"), ("fd", 2, "int32")),
    "cgroup_root": _fields(("ctrl", 1, "string"), ("path", 2, "string")),
    "unix_sk": _fields(("inode", 1, "uint32")),
    "criu_opts": _fields(
        ("images_dir_fd", 1, "int32"), ("pid", 2, "int32"), ("leave_running", 3, "bool"),
        ("ext_unix_sk", 4, "bool"), ("tcp_established", 5, "bool"),
        ("evasive_devices", 6, "bool"), ("shell_job", 7, "bool"), ("file_locks", 8, "bool"),
        ("log_level", 9, "int32"), ("log_file", 10, "string"),
        ("ps", 11, "criu_page_server_info"), ("notify_scripts", 12, "bool"),
        ("root", 13, "string"), ("parent_img", 14, "string"), ("track_mem", 15, "bool"),
        ("auto_dedup", 16, "bool"), ("work_dir_fd", 17, "int32"), ("link_remap", 18, "bool"),
        ("veths", 19, "criu_veth_pair", True), ("cpu_cap", 20, "uint32"),
        ("force_irmap", 21, "bool"), ("exec_cmd", 22, "string", True),
        ("ext_mnt", 23, "ext_mount_map", True), ("manage_cgroups", 24, "bool"),
        ("cg_root", 25, "cgroup_root", True), ("rst_sibling", 26, "bool"),
        ("inherit_fd", 27, "inherit_fd", True), ("auto_ext_mnt", 28, "bool"),
        ("ext_sharing", 29, "bool"), ("ext_masters", 30, "bool"),
        ("skip_mnt", 31, "string", True), ("enable_fs", 32, "string", True),
        ("unix_sk_ino", 33, "unix_sk", True), ("manage_cgroups_mode", 34, "enum"),
        ("ghost_limit", 35, "uint32"), ("irmap_scan_paths", 36, "string", True),
        ("external", 37, "string", True), ("empty_ns", 38, "uint32"),
        ("join_ns", 39, "join_namespace", True), ("cgroup_props", 41, "string"),
        ("cgroup_props_file", 42, "string"), ("cgroup_dump_controller", 43, "string", True),
        ("freeze_cgroup", 44, "string"), ("timeout", 45, "uint32"),
        ("tcp_skip_in_flight", 46, "bool"), ("weak_sysctls", 47, "bool"),
        ("lazy_pages", 48, "bool"), ("status_fd", 49, "int32"),
        ("orphan_pts_master", 50, "bool"), ("config_file", 51, "string"),
        ("tcp_close", 52, "bool"), ("lsm_profile", 53, "string"), ("tls_cacert", 54, "string"),
        ("tls_cacrl", 55, "string"), ("tls_cert", 56, "string"), ("tls_key", 57, "string"),
        ("tls", 58, "bool"), ("tls_no_cn_verify", 59, "bool"), ("cgroup_yard", 60, "string"),
        ("pre_dump_mode", 61, "enum"), ("pidfd_store_sk", 62, "int32"),
        ("lsm_mount_context", 63, "string"), ("network_lock", 64, "enum"),
        ("mntns_compat_mode", 65, "bool"), ("skip_file_rwx_check", 66, "bool"),
        ("unprivileged", 67, "bool"), ("images_dir", 68, "string"),
        ("leave_stopped", 69, "bool"), ("display_stats", 70, "bool"),
        ("log_to_stderr", 71, "bool")),
    "criu_dump_resp": _fields(("restored", 1, "bool")),
    "criu_restore_resp": _fields(("pid", 1, "int32")),
    "criu_notify": _fields(("script", 1, "string"), ("pid", 2, "int32")),
    "criu_features": _fields(
        ("mem_track", 1, "bool"), ("lazy_pages", 2, "bool"), ("pidfd_store", 3, "bool")),
    "criu_version": _fields(
        ("major_number", 1, "int32"), ("minor_number", 2, "int32"), ("gitid", 3, "string"),
        ("sublevel", 4, "int32"), ("extra", 5, "int32"), ("name", 6, "string")),
    "criu_req": _fields(
        ("type", 1, "enum"), ("opts", 2, "criu_opts"), ("notify_success", 3, "bool"),
        ("keep_open", 4, "bool"), ("features", 5, "criu_features"), ("pid", 6, "uint32")),
    "criu_resp": _fields(
        ("type", 1, "enum"), ("success", 2, "bool"), ("dump", 3, "criu_dump_resp"),
        ("restore", 4, "criu_restore_resp"), ("notify", 5, "criu_notify"),
        ("ps", 6, "criu_page_server_info"), ("cr_errno", 7, "int32"),
        ("features", 8, "criu_features"), ("cr_errmsg", 9, "string"),
        ("version", 10, "criu_version"), ("status", 11, "int32")),
}

# Required fields with a default: CRIU's unpacker rejects a message without them.
_ALWAYS: dict[str, dict[str, Any]] = {"criu_opts": {"images_dir_fd": -1}}

REQ_TYPES: dict[str, int] = {
    "EMPTY": 0, "DUMP": 1, "RESTORE": 2, "CHECK": 3, "PRE_DUMP": 4, "PAGE_SERVER": 5,
    "NOTIFY": 6, "CPUINFO_DUMP": 7, "CPUINFO_CHECK": 8, "FEATURE_CHECK": 9, "VERSION": 10,
    "WAIT_PID": 11, "PAGE_SERVER_CHLD": 12, "SINGLE_PRE_DUMP": 13}
CG_MODES: dict[str, int] = {
    "IGNORE": 0, "CG_NONE": 1, "PROPS": 2, "SOFT": 3, "FULL": 4, "STRICT": 5, "DEFAULT": 6}
NETWORK_LOCK_METHODS: dict[str, int] = {"IPTABLES": 1, "NFTABLES": 2, "SKIP": 3}
PRE_DUMP_MODES: dict[str, int] = {"SPLICE": 1, "VM_READ": 2}

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # a negative int32 goes out as 10 bytes, as protobuf sends it
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _scalar(kind: str, value: Any) -> tuple[int, bytes]:
    if kind == "string":
        data = value.encode()
        return _LEN, _varint(len(data)) + data
    if kind == "bool":
        return _VARINT, b"\x01" if value else b"\x00"
    if kind == "uint32" and not 0 <= value < 1 << 32:
        raise ValueError(f"{value} is out of range for uint32")
    if kind in ("int32", "enum") and not -(1 << 31) <= value < 1 << 31:
        raise ValueError(f"{value} is out of range for int32")
    return _VARINT, _varint(int(value))


def encode(message: str, values: dict[str, Any]) -> bytes:
    """``values`` as the wire bytes of ``message``; None values are left out."""
    schema = SCHEMA[message]
    unknown = set(values) - set(schema)
    if unknown:
        raise KeyError(f"{message} has no field {', '.join(sorted(unknown))}")
    values = {**_ALWAYS.get(message, {}), **{k: v for k, v in values.items() if v is not None}}
    out = bytearray()
    for name, (number, kind, repeated) in sorted(schema.items(), key=lambda item: item[1][0]):
        if name not in values:
            continue
        for item in values[name] if repeated else [values[name]]:
            if kind in _SCALARS:
                wire, data = _scalar(kind, item)
            else:
                body = encode(kind, item)
                wire, data = _LEN, _varint(len(body)) + body
            out += _varint(number << 3 | wire) + data
    return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        shift += 7
        if not byte & 0x80:
            return value, pos


def decode(message: str, data: bytes) -> dict[str, Any]:
    """The fields of ``message`` found in ``data``; unknown fields are skipped."""
    by_number = {number: (name, kind, rep) for name, (number, kind, rep) in SCHEMA[message].items()}
    result: dict[str, Any] = {}
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, wire = key >> 3, key & 7
        num, chunk = 0, b""
        if wire == _VARINT:
            num, pos = _read_varint(data, pos)
        elif wire == _LEN:
            size, pos = _read_varint(data, pos)
            chunk, pos = data[pos:pos + size], pos + size
            if pos > len(data):
                raise ValueError("truncated length-delimited field")
        elif wire in (_I64, _I32):
            pos += 8 if wire == _I64 else 4
            continue  # no fixed-width field in the schema: always unknown
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if number not in by_number:
            continue
        name, kind, repeated = by_number[number]
        if (wire == _LEN) != (kind == "string" or kind not in _SCALARS):
            raise ValueError(f"{message}.{name}: wire type {wire} does not fit {kind}")
        if kind == "string":
            value: Any = chunk.decode(errors="replace")
        elif kind not in _SCALARS:
            value = decode(kind, chunk)
        elif kind == "bool":
            value = bool(num)
        elif kind == "uint32":
            value = num & 0xFFFFFFFF
        else:  # int32, enum: the low 32 bits, sign-extended
            value = (num & 0xFFFFFFFF) - ((num & 0x80000000) << 1)
        if repeated:
            result.setdefault(name, []).append(value)
        else:
            result[name] = value  # proto2: the last one wins
    return result

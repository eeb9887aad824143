"""Pure logic of configuration: keys, sizes, CPU forms, effective config, plans, docs."""

from __future__ import annotations

import os

import pytest

from kamra.config import keys as keys_module
from kamra.config.hostinfo import HostInfo
from kamra.config.keys import (
    KEYS,
    check_consistency,
    format_value,
    parse_assignments,
    parse_size,
    parse_value,
    size_to_str,
)
from kamra.config.plans import BUILTIN_ORDER, Plan, PlanStore, builtin_plans
from kamra.config.resolve import effective, limits_only
from kamra.config.units import cpu_list_to_str, parse_cpu_list
from kamra.errors import AlreadyExists, InvalidInput, NotFound, ResourceBusy
from kamra.paths import Layout

K, M, G, T = 1 << 10, 1 << 20, 1 << 30, 1 << 40
# A host with 4 CPUs online, so results do not depend on the machine the tests run on.
HOST = HostInfo.with_online("0-3")


def parse(key: str, raw: object) -> object:
    return parse_value(key, raw, host=HOST)


def refused(key: str, raw: object) -> str:
    with pytest.raises(InvalidInput) as info:
        parse(key, raw)
    message = info.value.message
    assert "\n" not in message
    return message


# -- sizes ----------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, expected", [
    ("1024", 1024), (1024, 1024), ("64K", 64 * K), ("512M", 512 * M), ("2G", 2 * G),
    ("1T", T), ("512MiB", 512 * M), ("512MB", 512 * M), ("512m", 512 * M), ("1.5G", 3 * G // 2),
    (" 256M ", 256 * M), ("0", 0), ("100B", 100), (float(4 * M), 4 * M), ("0.5K", 512),
])
def test_parse_size(raw, expected):
    assert parse_size(raw) == expected


@pytest.mark.parametrize("raw", ["", "abc", "12X", "M", "1.5", "1..5G", "5 G B", "-1", True,
                                 None, [1], 1.5, "99999999P"])
def test_parse_size_refuses(raw):
    with pytest.raises(ValueError):
        parse_size(raw)


@pytest.mark.parametrize("value, text", [
    (0, "0"), (1000, "1000"), (1024, "1K"), (256 * M, "256M"), (3 * G // 2, "1.5G"),
    (5 * G // 4, "1.25G"), (T, "1T"), (1000 * 1000 * 1000, "976562.5K"), (1023, "1023"),
])
def test_size_to_str(value, text):
    assert size_to_str(value) == text
    assert parse_size(text) == value


@pytest.mark.parametrize("value", [1, 4095, 4 * M + 1, 7 * G // 3, 123456789012, 10 * T + 5 * G])
def test_size_round_trip(value):
    assert parse_size(size_to_str(value)) == value


# -- each key: good values ------------------------------------------------------------------

@pytest.mark.parametrize("key, raw, expected", [
    ("limits.cpu", "0.5", 0.5), ("limits.cpu", "2", 2.0), ("limits.cpu", 1.5, 1.5),
    ("limits.cpu", "150%", 1.5), ("limits.cpu", "25%", 0.25), ("limits.cpu", 4, 4.0),
    ("limits.cpu", "0.01", 0.01),
    ("limits.cpu.weight", "1", 1), ("limits.cpu.weight", 10000, 10000),
    ("limits.cpu.weight", "100", 100),
    ("limits.cpu.set", "0", "0"), ("limits.cpu.set", "0-1", "0-1"), ("limits.cpu.set", "0,1", "0-1"),
    ("limits.cpu.set", "3,0-1", "0-1,3"), ("limits.cpu.set", "0,2-3", "0,2-3"),
    ("limits.cpu.set", " 1 , 2 ", "1-2"), ("limits.cpu.set", 2, "2"),
    ("limits.memory", "512M", 512 * M), ("limits.memory", "4M", 4 * M), ("limits.memory", "2G", 2 * G),
    ("limits.memory", 4 * M, 4 * M),
    ("limits.memory.swap", "0", 0), ("limits.memory.swap", "1G", G),
    ("limits.memory.reservation", "256M", 256 * M),
    ("limits.pids", "1", 1), ("limits.pids", 512, 512),
    ("limits.io.weight", "500", 500),
    ("limits.io.read_bps", "10M", 10 * M), ("limits.io.write_bps", "1048576", M),
    ("limits.io.read_iops", "1000", 1000), ("limits.io.write_iops", 1, 1),
    ("limits.disk", "16M", 16 * M), ("limits.disk", "10G", 10 * G),
    ("limits.net.egress", "10mbit", 10_000_000), ("limits.net.ingress", "1.5gbit", 1_500_000_000),
    ("limits.net.egress", "500kbit", 500_000), ("limits.net.ingress", "8000", 8000),
    ("net.mode", "Bridge", "bridge"), ("net.mode", "none", "none"),
    ("net.ipv4", " 10.73.0.9 ", "10.73.0.9"), ("net.ipv6", "fd42:0::5", "fd42::5"),
    ("net.nat", "no", False), ("net.isolated", "on", True), ("net.nat", True, True),
    ("net.nameservers", "192.0.2.53, 2001:db8::53", ["192.0.2.53", "2001:db8::53"]),
])
def test_good_values(key, raw, expected):
    value = parse(key, raw)
    assert value == expected and type(value) is type(expected)
    # Normalized values parse to themselves (stored values are re-read through the parser),
    # and what is displayed can be typed back in.
    assert parse(key, value) == value
    assert parse(key, format_value(key, value)) == value


# -- each key: bad values -------------------------------------------------------------------

@pytest.mark.parametrize("key, raw, words", [
    ("limits.cpu", "0", "below the minimum"), ("limits.cpu", "-1", "negative"),
    ("limits.cpu", "abc", "invalid CPU amount"), ("limits.cpu", "1.5 cores", "invalid"),
    ("limits.cpu", "5", "more than this host's 4 CPUs"), ("limits.cpu", "600%", "more than"),
    ("limits.cpu", True, "invalid"), ("limits.cpu", float("nan"), "invalid"),
    ("limits.cpu.weight", "0", "out of range"), ("limits.cpu.weight", "10001", "out of range"),
    ("limits.cpu.weight", "-5", "out of range"), ("limits.cpu.weight", "1.5", "invalid number"),
    ("limits.cpu.set", "", "invalid CPU list"), ("limits.cpu.set", "a", "invalid CPU list"),
    ("limits.cpu.set", "1-", "invalid CPU list"), ("limits.cpu.set", "3-1", "end before start"),
    ("limits.cpu.set", "-1", "invalid CPU list"), ("limits.cpu.set", "0,,1", "invalid CPU list"),
    ("limits.cpu.set", "0-99999999", "beyond"),
    ("limits.memory", "abc", "invalid size 'abc'"), ("limits.memory", "0", "below the minimum of 4M"),
    ("limits.memory", "1M", "below the minimum of 4M"), ("limits.memory", "-512M", "negative size"),
    ("limits.memory", "512X", "invalid size"), ("limits.memory", "", "invalid size"),
    ("limits.memory.swap", "-1G", "negative size"), ("limits.memory.swap", "lots", "invalid size"),
    ("limits.memory.reservation", "0", "too small"),
    ("limits.pids", "0", "out of range"), ("limits.pids", "-1", "out of range"),
    ("limits.pids", "many", "invalid number"),
    ("limits.io.weight", "0", "out of range"), ("limits.io.weight", "20000", "out of range"),
    ("limits.io.read_bps", "0", "too small"), ("limits.io.write_bps", "-10M", "negative"),
    ("limits.io.read_iops", "0", "out of range"), ("limits.io.write_iops", "fast", "invalid"),
    ("limits.disk", "1M", "too small"), ("limits.disk", "0", "too small"),
    ("limits.disk", "ten gigs", "invalid size"),
    ("limits.net.egress", "fast", "invalid rate"), ("limits.net.egress", "1kbit", "below"),
    ("limits.net.ingress", "-5mbit", "invalid rate"), ("limits.net.ingress", "10mbps", "invalid"),
    ("net.mode", "veth", "unknown network mode"), ("net.mode", "", "unknown network mode"),
    ("net.ipv4", "10.0.0", "not an IPv4 address"), ("net.ipv4", "::1", "not an IPv4"),
    ("net.ipv4", "224.0.0.1", "cannot be a container's address"),
    ("net.ipv6", "10.0.0.1", "not an IPv6 address"),
    ("net.nat", "maybe", "not true or false"), ("net.isolated", "2", "not true or false"),
    ("net.nameservers", "dns.example", "not an IP address"),
    ("net.nameservers", "", "no address given"),
])
def test_bad_values(key, raw, words):
    message = refused(key, raw)
    assert message.startswith(f"{key}: ") and words in message
    assert ": use " in message  # every refusal says what would be accepted


def test_memory_error_names_value_and_form():
    assert refused("limits.memory", "abc") == (
        "limits.memory: invalid size 'abc': use a number of bytes or a size like 512M or 2G; "
        "at least 4M")


def test_every_key_has_a_bad_value_test():
    tested = {key for key, _, _ in test_bad_values.pytestmark[0].args[1]}
    assert tested == set(KEYS)


def test_cpu_set_names_missing_cpus_and_host_list():
    host = HostInfo.with_online("0-1")
    with pytest.raises(InvalidInput) as info:
        parse_value("limits.cpu.set", "0-3", host=host)
    assert "CPUs 2-3 do not exist" in info.value.message and "online: 0-1" in info.value.message
    with pytest.raises(InvalidInput) as info:
        parse_value("limits.cpu.set", "5", host=HostInfo.with_online("0,2-3"))
    assert "CPU 5 does not exist" in info.value.message and "online: 0,2-3" in info.value.message
    assert parse_value("limits.cpu.set", "0,3", host=HostInfo.with_online("0,2-3")) == "0,3"


def test_host_checks_can_be_skipped_for_stored_values():
    small = HostInfo.with_online("0")
    with pytest.raises(InvalidInput):
        parse_value("limits.cpu", 8, host=small)
    assert parse_value("limits.cpu", 8, host=small, check_host=False) == 8.0
    assert parse_value("limits.cpu.set", "0-7", host=small, check_host=False) == "0-7"


def test_current_host_is_read_from_sysfs():
    host = HostInfo.current()
    assert host.online and host.cpu_count == (os.cpu_count() or 1)
    assert parse_value("limits.cpu.set", host.online_text) == host.online_text
    assert parse_value("limits.cpu", host.cpu_count) == float(host.cpu_count)


@pytest.mark.parametrize("text, cpus", [("0", (0,)), ("0-2,5", (0, 1, 2, 5)), ("5,0-2,1", (0, 1, 2, 5))])
def test_cpu_list_round_trip(text, cpus):
    assert parse_cpu_list(text) == cpus
    assert parse_cpu_list(cpu_list_to_str(cpus)) == cpus


@pytest.mark.parametrize("raw, shown", [("0.5", "0.5"), ("2", "2"), ("150%", "1.5"),
                                         ("0.3333", "0.333"), ("1.25", "1.25")])
def test_cpu_formatting(raw, shown):
    value = parse("limits.cpu", raw)
    assert format_value("limits.cpu", value) == shown
    assert parse("limits.cpu", shown) == value


# -- unknown keys, assignments, display -----------------------------------------------------

def test_unknown_key_suggests_a_close_one():
    with pytest.raises(InvalidInput) as info:
        parse_value("limits.mem", "1G")
    assert info.value.message == ("unknown config key 'limits.mem': see 'kamra config keys' "
                                  "(did you mean 'limits.memory'?)")
    with pytest.raises(InvalidInput) as info:
        parse_value("colour", "blue")
    assert info.value.message == "unknown config key 'colour': see 'kamra config keys'"


def test_parse_assignments():
    values, unset = parse_assignments(["limits.memory=512M", "limits.cpu=150%", "limits.pids=",
                                       "limits.cpu.set=1,0"], host=HOST)
    assert values == {"limits.memory": 512 * M, "limits.cpu": 1.5, "limits.cpu.set": "0-1"}
    assert unset == ["limits.pids"]
    # The last mention of a key wins, whether it sets or unsets.
    assert parse_assignments(["limits.pids=5", "limits.pids="]) == ({}, ["limits.pids"])
    assert parse_assignments(["limits.pids=", "limits.pids=5"]) == ({"limits.pids": 5}, [])


@pytest.mark.parametrize("pairs, words", [
    (["limits.memory"], "write KEY=VALUE"), (["=5"], "write KEY=VALUE"),
    (["limits.mem=1G"], "did you mean 'limits.memory'"), (["limits.mem="], "unknown config key"),
    (["limits.memory=lots"], "limits.memory: invalid size 'lots'"),
])
def test_parse_assignments_refuses(pairs, words):
    with pytest.raises(InvalidInput) as info:
        parse_assignments(pairs, host=HOST)
    assert words in info.value.message


def test_format_value():
    assert format_value("limits.memory", 256 * M) == "256M"
    assert format_value("limits.memory", 3 * G // 2) == "1.5G"
    assert format_value("limits.io.read_bps", 10 * M) == "10M"
    assert format_value("limits.cpu", 0.5) == "0.5"
    assert format_value("limits.pids", 512) == "512"
    assert format_value("limits.memory", None) == "unlimited"
    assert format_value("limits.cpu.set", None) == "all CPUs"


def test_registry_is_complete():
    expected = {"limits.cpu", "limits.cpu.weight", "limits.cpu.set", "limits.memory",
                "limits.memory.swap", "limits.memory.reservation", "limits.pids",
                "limits.io.weight", "limits.io.read_bps", "limits.io.write_bps",
                "limits.io.read_iops", "limits.io.write_iops", "limits.disk",
                "limits.net.egress", "limits.net.ingress", "net.mode", "net.ipv4", "net.ipv6",
                "net.nat", "net.isolated", "net.nameservers"}
    assert set(KEYS) == expected
    for name, key in KEYS.items():
        assert key.name == name and key.doc and "\n" not in key.doc and key.form
        if name.startswith("limits."):
            assert key.live  # every limit can change on a running container
        assert key.to_json()["key"] == name
    # What is wired at start (the veth, its addresses, resolv.conf) waits for a restart.
    assert {n for n, k in KEYS.items() if not k.live} == {"net.mode", "net.ipv4", "net.ipv6",
                                                          "net.nameservers"}
    assert KEYS["limits.disk"].grow_only_live
    assert not any(k.grow_only_live for n, k in KEYS.items() if n != "limits.disk")


def test_consistency():
    check_consistency({"limits.memory": G, "limits.memory.reservation": G})
    check_consistency({"limits.memory": None, "limits.memory.reservation": G})
    check_consistency({"limits.memory.reservation": G})
    with pytest.raises(InvalidInput) as info:
        check_consistency({"limits.memory": 512 * M, "limits.memory.reservation": G})
    assert "limits.memory.reservation (1G) is larger than limits.memory (512M)" in info.value.message


# -- effective configuration ----------------------------------------------------------------

def test_effective_sources():
    result = effective("small", {"limits.memory": 512 * M, "limits.pids": 512},
                       {"limits.pids": 70, "limits.cpu": 0.5})
    assert set(result) == set(KEYS)
    assert result["limits.memory"] == (512 * M, "plan small")
    assert result["limits.pids"] == (70, "container")
    assert result["limits.cpu"] == (0.5, "container")
    assert result["limits.disk"] == (None, "default")
    assert limits_only(result) == {"limits.memory": 512 * M, "limits.pids": 70, "limits.cpu": 0.5}


def test_effective_without_plan_ignores_none_and_unknown_keys():
    result = effective(None, {}, {"limits.pids": None, "net.future": "x"})
    assert all(source == "default" for _, source in result.values())
    assert limits_only(result) == {}


# -- plans ----------------------------------------------------------------------------------

@pytest.fixture
def store(tmp_path):
    return PlanStore(Layout.at(str(tmp_path)))


def test_builtin_plans_load_and_validate():
    plans = builtin_plans()
    assert tuple(plans) == BUILTIN_ORDER
    for plan in plans.values():
        assert plan.builtin and plan.description
        for key, value in plan.values.items():
            assert parse_value(key, value, check_host=False) == value
        check_consistency(plan.values)
    assert plans["unlimited"].values == {}
    # A graded series: every limit grows from one plan to the next.
    graded = [plans[n].values for n in ("micro", "small", "medium", "large")]
    for key in graded[0]:
        assert [v[key] for v in graded] == sorted(v[key] for v in graded), key
    assert plans["small"].values["limits.memory"] == 512 * M


def test_plan_store_lists_builtins_first(store):
    assert [p.name for p in store.list()] == list(BUILTIN_ORDER)
    assert store.get("medium").builtin


def test_plan_create_get_update_remove(store, tmp_path):
    plan = store.create("web", {"limits.memory": "1G", "limits.cpu": "150%"}, "web servers")
    assert plan == Plan("web", "web servers", {"limits.cpu": 1.5, "limits.memory": G}, False)
    path = tmp_path / "plans" / "web.toml"
    text = path.read_text()
    assert '"limits.memory" = "1G"' in text and '"limits.cpu" = 1.5' in text
    assert store.get("web") == plan
    assert [p.name for p in store.list()] == [*BUILTIN_ORDER, "web"]

    updated = store.update("web", {"limits.pids": "100"}, unset=["limits.cpu"])
    assert updated.values == {"limits.memory": G, "limits.pids": 100}
    assert updated.description == "web servers"
    assert store.get("web") == updated
    assert store.update("web", {}, description="front ends").description == "front ends"

    data = store.get("web").to_json()
    assert data["values"] == {"limits.memory": G, "limits.pids": 100}
    assert data["display"] == {"limits.memory": "1G", "limits.pids": "100"}
    assert data["builtin"] is False and data["name"] == "web"

    store.remove("web", users=[])
    assert not path.exists()
    with pytest.raises(NotFound):
        store.get("web")


def test_plan_refusals(store, tmp_path):
    with pytest.raises(NotFound) as info:
        store.get("nosuch")
    assert "'kamra plan list'" in info.value.message
    with pytest.raises(NotFound):
        store.update("nosuch", {"limits.pids": 5})
    with pytest.raises(NotFound):
        store.remove("nosuch", [])
    with pytest.raises(InvalidInput):
        store.create("Bad Name", {})
    with pytest.raises(InvalidInput) as info:
        store.create("p1", {"limits.memory": "lots"})
    assert info.value.message.startswith("limits.memory: invalid size")
    with pytest.raises(InvalidInput):
        store.create("p1", {"limits.memory": "512M", "limits.memory.reservation": "1G"})
    with pytest.raises(InvalidInput):
        store.create("p1", {}, "two\nlines")
    assert not os.path.exists(tmp_path / "plans" / "p1.toml")  # nothing saved on refusal

    store.create("p1", {"limits.memory": "512M"})
    with pytest.raises(AlreadyExists):
        store.create("p1", {})
    with pytest.raises(InvalidInput):
        store.update("p1", {"limits.memory.reservation": "1G"})
    with pytest.raises(InvalidInput):
        store.update("p1", {}, unset=["limits.mem"])
    assert store.get("p1").values == {"limits.memory": 512 * M}


def test_builtin_plans_are_read_only(store):
    with pytest.raises(InvalidInput) as info:
        store.update("small", {"limits.pids": 5})
    assert info.value.message == ("built-in plan 'small' cannot be changed: "
                                  "create your own with 'kamra plan create'")
    with pytest.raises(InvalidInput):
        store.remove("small", [])
    with pytest.raises(AlreadyExists):
        store.create("small", {"limits.pids": 5})


def test_remove_refuses_plan_in_use(store):
    store.create("busy", {"limits.pids": 5})
    with pytest.raises(ResourceBusy) as info:
        store.remove("busy", ["c2", "c1"])
    assert "c1, c2" in info.value.message
    assert store.get("busy").values == {"limits.pids": 5}


def test_user_file_cannot_shadow_builtin(store, tmp_path):
    plans = tmp_path / "plans"
    plans.mkdir()
    (plans / "small.toml").write_text('description = "mine"\n[config]\n"limits.pids" = 1\n')
    assert store.get("small").builtin and store.get("small").values["limits.pids"] == 512
    assert [p.name for p in store.list()] == list(BUILTIN_ORDER)


def test_hand_written_plan_is_validated(store, tmp_path):
    plans = tmp_path / "plans"
    plans.mkdir()
    (plans / "bad.toml").write_text('[config]\n"limits.memory" = "lots"\n')
    with pytest.raises(InvalidInput) as info:
        store.get("bad")
    assert "bad.toml" in info.value.message and "limits.memory" in info.value.message
    (plans / "bad.toml").write_text('memory = "1G"\n')
    with pytest.raises(InvalidInput) as info:
        store.get("bad")
    assert "unknown entry 'memory'" in info.value.message
    # A user plan's large CPU quota still loads on a smaller host: checked when assigned.
    (plans / "big.toml").write_text('[config]\n"limits.cpu" = 4096\n')
    assert store.get("big").values == {"limits.cpu": 4096.0}


def test_create_checks_the_host(store, monkeypatch):
    monkeypatch.setattr(keys_module.HostInfo, "current",
                        classmethod(lambda cls: HostInfo.with_online("0")))
    with pytest.raises(InvalidInput) as info:
        store.create("pinned", {"limits.cpu.set": "1"})
    assert "CPU 1 does not exist" in info.value.message

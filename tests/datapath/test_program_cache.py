"""The compiled-program cache for real: a build BCC compiled, saved, loaded again by raw
syscalls into another private pin directory, must be the same program (same kernel tag,
same verdicts and counters on the same frames under BPF_PROG_TEST_RUN). An entry that is
corrupt, foreign or writable by others is ignored and compiled again; another table size
or another source misses."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from frames import ETH_P_IPV6, UDP, ethernet, ipv6, transport
from private_datapath import udp_frame
from prog_run import TC_ACT_SHOT, TC_ACT_UNSPEC, Program, skb_context

from agent.datapath import Datapath, PinnedMap, program
from agent.datapath import program_cache as cache
from agent.datapath.cached_load import load_compiled, map_id
from agent.datapath.maps import MAP_PINS
from agent.datapath.program import bpf_source_dir
from agent.datapath.syscalls import fd_info
from agent.policy import Rule, lpm_entries

pytestmark = pytest.mark.system

TABLE_SIZE = 2048
IFINDEX, SLOT = 1, 7  # test runs happen on the loopback device
BLOCKED_PORT = 9444
NOBODY_UID = 65534


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "program-cache"
    monkeypatch.setenv(cache.CACHE_DIR_ENV, str(directory))
    return directory


@pytest.fixture
def compiles(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The flow table sizes the BCC loader child was run for (it still runs)."""
    runs: list[int] = []
    real_run_loader = program.run_loader

    def counting_run_loader(flow_table_size: int, pin_dir: Path) -> None:
        runs.append(flow_table_size)
        real_run_loader(flow_table_size, pin_dir)

    monkeypatch.setattr(program, "run_loader", counting_run_loader)
    return runs


@contextlib.contextmanager
def loaded(flow_table_size: int = TABLE_SIZE) -> Iterator[Datapath]:
    """A datapath with its pins in a private bpffs directory, removed afterwards. The pin
    directory does not exist yet, as the live one (PIN_DIR) after a cleanup."""
    private = Path(tempfile.mkdtemp(prefix="egress-top-cache-test-", dir="/sys/fs/bpf"))
    try:
        datapath = Datapath(flow_table_size=flow_table_size, pin_dir=private / "v1")
        try:
            yield datapath
        finally:
            datapath.close()
    finally:
        shutil.rmtree(private, ignore_errors=True)


def entry_path(flow_table_size: int = TABLE_SIZE) -> Path:
    return cache.cache_dir() / f"{cache.cache_key(flow_table_size, bpf_source_dir())}.json"


def program_tag(fd: int) -> str:
    """The kernel's hash of the instructions (map fds left out): equal for equal programs."""
    tag = fd_info(fd).get("prog_tag")
    assert tag is not None, f"fd {fd} is not a program"
    return tag.strip()


def pin_layout(pin_dir: Path) -> tuple[list[str], int]:
    """The map pins, and how many program pins (their names carry the pin directory)."""
    names = sorted(path.name for path in pin_dir.iterdir())
    programs = [name for name in names if name.startswith(program.PROGRAM_PIN_PREFIX)]
    return [name for name in names if name not in programs], len(programs)


FRAMES = {
    "v4 to the blocked port": udp_frame("198.18.0.2", "198.51.100.7", 40000, BLOCKED_PORT),
    "v4 to another port": udp_frame("198.18.0.2", "198.51.100.7", 40000, 53),
    "v4 elsewhere": udp_frame("198.18.0.2", "198.18.3.4", 40001, BLOCKED_PORT),
    "v6": ethernet(
        ETH_P_IPV6, ipv6("2001:db8:1::2", "2001:db8:100::7", UDP, (), transport(UDP, 40000, 443, b"x"), 0)
    ),
}
EXPECTED_VERDICTS = {
    "v4 to the blocked port": TC_ACT_SHOT,
    "v4 to another port": TC_ACT_UNSPEC,
    "v4 elsewhere": TC_ACT_UNSPEC,
    "v6": TC_ACT_UNSPEC,
}


def what_it_does(datapath: Datapath) -> dict[str, object]:
    """Verdicts, flows and counters after the frames, with one rule blocking BLOCKED_PORT."""
    rule = Rule(
        1, "web", "198.51.100.0/24", "cidr", BLOCKED_PORT, "udp", "block", "2026-12-01T00:00:00Z",
        ("198.51.100.0/24",),
    )  # fmt: skip
    datapath.sync_policy(
        (entry.key_bytes(), entry.value_bytes()) for entry in lpm_entries([rule], {"web": SLOT})
    )
    datapath.set_endpoint(IFINDEX, SLOT, has_policy=True)
    runner = Program(datapath.program_fd, skb_context(IFINDEX))
    verdicts = {name: runner.run(frame) for name, frame in FRAMES.items()}
    flows = datapath.read_flows()
    counted = sorted(
        (bytes(key.tobytes()), int(stats["packets"]), int(stats["bytes"]), int(stats["dropped_packets"]))
        for key, stats in zip(flows.keys, flows.stats, strict=True)
    )
    return {
        "verdicts": verdicts,
        "flows": counted,
        "totals": datapath.read_endpoint_totals(),
        "rule packets": {rule_id: hit.packets for rule_id, hit in datapath.read_rule_hits().items()},
    }


def test_the_cached_load_is_the_compiled_program(cache_dir: Path, compiles: list[int]) -> None:
    with loaded() as compiled:
        assert compiles == [TABLE_SIZE]  # an empty cache: BCC compiled it
        entry = os.stat(entry_path())
        assert (entry.st_uid, stat.S_IMODE(entry.st_mode)) == (0, 0o600)
        assert stat.S_IMODE(os.stat(cache_dir).st_mode) == 0o700
        saved = cache.load(cache.cache_key(TABLE_SIZE, bpf_source_dir()))
        assert saved is not None
        assert {spec.name for spec in saved.maps if spec.pinned} == set(MAP_PINS)  # the same pin layout
        compiled_tag = program_tag(compiled.program_fd)
        compiled_pins = pin_layout(compiled.pin_dir)
        compiled_does = what_it_does(compiled)
    with loaded() as cached:
        assert compiles == [TABLE_SIZE]  # no second compile: loaded from the entry
        assert program_tag(cached.program_fd) == compiled_tag
        assert pin_layout(cached.pin_dir) == compiled_pins == (sorted(MAP_PINS), 1)
        cached_does = what_it_does(cached)
    assert cached_does == compiled_does
    assert compiled_does["verdicts"] == EXPECTED_VERDICTS  # the rule did something: a control
    assert len(compiled_does["flows"]) == len(FRAMES)  # type: ignore[arg-type]
    assert compiled_does["rule packets"] == {1: 1}


def _flip_an_instruction(path: Path) -> None:
    """A valid JSON entry whose program differs by one byte: only the digest tells."""
    entry = json.loads(path.read_text())
    code = bytearray(base64.b64decode(entry["program"]["instructions"]))
    code[-8] ^= 0x01  # the last instruction (exit) becomes another opcode
    entry["program"]["instructions"] = base64.b64encode(code).decode()
    path.write_text(json.dumps(entry))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def _give_to_nobody(path: Path) -> None:
    os.chown(path, NOBODY_UID, NOBODY_UID)


def _make_world_writable(path: Path) -> None:
    path.chmod(0o666)


def _replace_by_a_symlink(path: Path) -> None:
    target = path.with_name("elsewhere.data")
    path.rename(target)
    path.symlink_to(target)


@pytest.mark.parametrize(
    "tamper", [_flip_an_instruction, _truncate, _give_to_nobody, _make_world_writable, _replace_by_a_symlink]
)
def test_an_untrustworthy_entry_is_ignored_and_rebuilt(
    cache_dir: Path, compiles: list[int], tamper: Callable[[Path], None]
) -> None:
    with loaded():
        pass
    path = entry_path()
    good = path.read_bytes()
    tamper(path)
    assert cache.load(cache.cache_key(TABLE_SIZE, bpf_source_dir())) is None
    with loaded() as rebuilt:
        assert compiles == [TABLE_SIZE, TABLE_SIZE]  # compiled again rather than trusted
        assert rebuilt.flow_table_size == TABLE_SIZE
    info = os.lstat(path)
    assert stat.S_ISREG(info.st_mode) and (info.st_uid, stat.S_IMODE(info.st_mode)) == (0, 0o600)
    assert json.loads(path.read_bytes())["digest"] == json.loads(good)["digest"]  # the same build again
    assert cache.load(cache.cache_key(TABLE_SIZE, bpf_source_dir())) is not None


def test_another_table_size_or_source_misses(cache_dir: Path, compiles: list[int], tmp_path: Path) -> None:
    with loaded():
        pass
    with loaded(TABLE_SIZE * 2) as bigger:
        assert compiles == [TABLE_SIZE, TABLE_SIZE * 2]
        assert bigger.flow_table_size == TABLE_SIZE * 2
    assert sorted(path.name for path in cache_dir.glob("*.json")) == sorted(
        (entry_path().name, entry_path(TABLE_SIZE * 2).name)
    )
    edited = tmp_path / "bpf"
    shutil.copytree(bpf_source_dir(), edited)
    with (edited / "egress.c").open("a") as source:
        source.write("/* one more comment */\n")
    assert cache.cache_key(TABLE_SIZE, edited) != cache.cache_key(TABLE_SIZE, bpf_source_dir())
    assert cache.cache_key(TABLE_SIZE, edited).split("-")[0] == cache.kernel_stamp()


def test_pinned_maps_are_reused_only_when_they_match(cache_dir: Path, compiles: list[int]) -> None:
    with loaded():
        pass
    with loaded(TABLE_SIZE * 2):
        pass
    small = cache.load(cache.cache_key(TABLE_SIZE, bpf_source_dir()))
    big = cache.load(cache.cache_key(TABLE_SIZE * 2, bpf_source_dir()))
    assert small is not None and big is not None
    with loaded() as pinned:
        assert load_compiled(big, pinned.pin_dir) is None  # its flow table is another size
        again = load_compiled(small, pinned.pin_dir)
        assert again is not None
        try:
            assert program_tag(again) == program_tag(pinned.program_fd)
        finally:
            os.close(again)
        reopened = PinnedMap(pinned.pin_dir / "flows")
        try:
            assert map_id(reopened.fd) == map_id(pinned.flows.fd)  # the same pinned table, not a new one
        finally:
            reopened.close()
    assert compiles == [TABLE_SIZE, TABLE_SIZE * 2]


def test_entries_of_another_kernel_and_the_oldest_are_dropped(cache_dir: Path) -> None:
    """Pure file logic: a stand-in program, never loaded."""
    stand_in = cache.CompiledProgram("stand_in", "GPL", bytes(8), (), ())
    other_kernel = f"{'0' * 16}-{'a' * 64}"
    assert not other_kernel.startswith(cache.kernel_stamp())
    cache.save(other_kernel, stand_in)
    keys = [f"{cache.kernel_stamp()}-{number:064x}" for number in range(cache.MAX_ENTRIES + 4)]
    for key in keys:
        cache.save(key, stand_in)
    names = {path.name for path in cache_dir.glob("*.json")}
    assert len(names) == cache.MAX_ENTRIES
    assert f"{keys[-1]}.json" in names and f"{other_kernel}.json" not in names
    assert cache.load(keys[-1]) == stand_in
    assert not list(cache_dir.glob(".*"))  # no partial file left behind

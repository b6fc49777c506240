"""The agent's --export file rotated while records flow: by Debian's logrotate with the
shipped deploy/egress-agent.logrotate, and by --export-max-mb. Nothing may be lost or split:
every line of every file is one schema-valid record, and each flow's packets_delta summed
over all files equals the datagrams the container sent."""

from __future__ import annotations

import gzip
import subprocess
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from lab import UPSTREAM_V4, Lab, wait_until
from runner import Agent, nothing_left_behind, parse_records

from agent.export_file import ExportFile

REPO = Path(__file__).resolve().parent.parent
LOGROTATE_CONF = REPO / "deploy" / "egress-agent.logrotate"
SHIPPED_PATH = "/var/log/egress-top/flows.ndjson"
BATCHES, PER_BATCH = 6, 40


@pytest.fixture
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lab: Lab) -> Iterator[Path]:
    yield from nothing_left_behind(tmp_path, monkeypatch)


def all_lines(export: Path) -> list[str]:
    """Every line of the export and its rotated siblings (gzipped or not); a file must end
    in a newline (a split record would leave a partial last line)."""
    lines = []
    for path in sorted(export.parent.glob(export.name + "*")):
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        assert not data or data.endswith(b"\n"), f"{path.name} ends inside a record"
        lines += data.decode().splitlines()
    return lines


def packets_by_source_port(export: Path, container_name: str) -> Counter[int]:
    records = parse_records("\n".join(all_lines(export)))  # each line: valid JSON, schema-checked
    sums: Counter[int] = Counter()
    for record in records:
        if record["container_name"] == container_name and record["proto"] == "udp":
            sums[record["src_port"]] += record["packets_delta"]
    return sums


def counted_as_sent(export: Path, container_name: str, sent: dict[int, int]) -> None:
    """Wait until each flow's packets_delta, summed over every file, is what was sent."""
    wait_until(
        lambda: packets_by_source_port(export, container_name) == Counter(sent),
        timeout=10,
        describe=lambda: (
            f"sent {sorted(sent.items())}, counted {sorted(packets_by_source_port(export, container_name).items())}"
            f" in {len(list(export.parent.glob(export.name + '*')))} files"
        ),
    )


def send_batches(lab: Lab, container, port: int, sent: dict[int, int]) -> threading.Thread:
    """Bounded traffic in the background: BATCHES flows of PER_BATCH datagrams, each from its
    own socket (its own flow), spread over ~3 s so rotations fall in the middle."""

    def run() -> None:
        for _ in range(BATCHES):
            src_port = lab.send_udp(container, UPSTREAM_V4, port, count=PER_BATCH, size=64, interval=0.0125)
            sent[src_port] = PER_BATCH

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_logrotate_with_the_shipped_config_loses_and_splits_nothing(
    tmp_path: Path, state_dir: Path, lab: Lab, upstream
) -> None:
    container = lab.container("rotated", network=lab.network())
    sink = upstream.udp_sink(5400)
    export = tmp_path / "log" / "flows.ndjson"
    export.parent.mkdir()
    agent = Agent("-i", "0.1", "--metrics", "off", "--export", str(export))
    try:
        agent.wait_ready()
        config = LOGROTATE_CONF.read_text()
        directives = [line.split()[0] for line in config.splitlines() if line.strip() and line[0] != "#"]
        assert "copytruncate" not in directives and SHIPPED_PATH in directives
        # Only the path changes, and the fallback signals this test's agent, not every
        # egress-agent on the machine (no systemd here: `systemctl kill` fails first).
        conf = tmp_path / "logrotate.conf"
        conf.write_text(
            config.replace(SHIPPED_PATH, str(export)).replace(
                "pkill -HUP -x egress-agent", f"kill -HUP {agent.proc.pid}"
            )
        )
        sent: dict[int, int] = {}
        sender = send_batches(lab, container, 5400, sent)
        rotations = 0
        while sender.is_alive() and rotations < 4:
            wait_until(lambda: export.exists() and export.stat().st_size > 0, timeout=10)  # reopened, written
            subprocess.run(
                ["logrotate", "-f", "-s", str(tmp_path / "logrotate.state"), str(conf)],
                check=True,
                capture_output=True,
                timeout=30,
            )
            rotations += 1
        sender.join(timeout=60)
        assert rotations >= 2, "the traffic ended before two rotations: nothing was rotated while it flowed"
        assert sink.wait_for(BATCHES * PER_BATCH, timeout=10)[0] == BATCHES * PER_BATCH
        counted_as_sent(export, container.name, sent)
        assert agent.proc.poll() is None, agent.stderr_lines  # SIGHUP reopened, it did not stop
    finally:
        assert agent.stop() == 0, agent.stderr_lines
    rotated = sorted(p.name for p in export.parent.iterdir())
    assert "flows.ndjson.1" in rotated and any(name.endswith(".gz") for name in rotated), rotated


def test_size_rotation_keeps_k_files_and_splits_nothing(
    tmp_path: Path, state_dir: Path, lab: Lab, upstream
) -> None:
    container = lab.container("sized", network=lab.network())
    upstream.udp_sink(5461)
    export = tmp_path / "flows.ndjson"
    # A refresh every 0.2 s: ~3 files of 2 KB a second, so the 50 kept hold ~15 s of records, room
    # for a slow sender; at 0.1 s a machine slower to send than ~9 s lost its oldest records.
    agent = Agent(
        "-i",
        "0.2",
        "--metrics",
        "off",
        "--export",
        str(export),
        "--export-max-mb",
        "0.002",
        "--export-keep",
        "50",
    )
    try:
        agent.wait_ready()
        sent: dict[int, int] = {}
        send_batches(lab, container, 5461, sent).join(timeout=60)
        counted_as_sent(export, container.name, sent)
    finally:
        assert agent.stop() == 0, agent.stderr_lines
    rotated = [p for p in tmp_path.iterdir() if p.name.startswith("flows.ndjson.")]
    assert len(rotated) >= 3, "2 KB files: a few seconds of records must fill several"
    assert all(p.stat().st_size < 2048 + 8192 for p in rotated)  # rotated at the first interval past 2 KB


def test_rotation_keeps_exactly_k_files_newest_first(tmp_path: Path) -> None:
    export = ExportFile(tmp_path / "flows.ndjson", max_bytes=10, keep=3)
    for number in range(6):
        out = export.writer()
        out.write(f'{{"n": {number}, "pad": "0123456789"}}\n')
        out.flush()
    export.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["flows.ndjson", "flows.ndjson.1", "flows.ndjson.2", "flows.ndjson.3"]
    assert [int(p.read_text().split()[1].rstrip(",")) for p in (tmp_path / n for n in names)] == [5, 4, 3, 2]


def test_reopen_follows_the_path_only_between_writes(tmp_path: Path) -> None:
    path = tmp_path / "flows.ndjson"
    export = ExportFile(path)
    export.writer().write("one\n")
    path.rename(tmp_path / "moved")
    export.request_reopen()
    assert not path.exists()  # nothing happens until the next interval asks for the writer
    export.writer().write("two\n")
    export.close()
    assert ((tmp_path / "moved").read_text(), path.read_text()) == ("one\n", "two\n")
    assert path.stat().st_mode & 0o777 == 0o640

"""iperf3 between the container and the upstream netns: one run of one measure at a time."""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass
from typing import Any

from bench.environment import UPSTREAM_NETNS, UPSTREAM_SERVER, Environment, netns_exec

IPERF_PORT = 5201


class MeasurementFailed(Exception):
    """A run that produced no figure."""


@dataclass(frozen=True)
class Measure:
    name: str
    iperf_args: tuple[str, ...]
    primary: str  # the metric the ratios are about

    def parse(self, report: dict[str, Any]) -> dict[str, float]:
        end = report["end"]
        if self.primary == "bits_per_second":
            return {
                "bits_per_second": float(end["sum_received"]["bits_per_second"]),
                "retransmits": float(end["sum_sent"].get("retransmits", 0)),
            }
        received = end["sum_received"]  # the server's count, as the client got it back
        delivered = received["packets"] - received["lost_packets"]
        return {
            "packets_per_second": delivered / received["seconds"],
            "sent_packets_per_second": received["packets"] / received["seconds"],
            "loss_percent": float(received["lost_percent"]),
        }


TCP_1_STREAM = Measure("tcp_1_stream", ("-P", "1"), "bits_per_second")
TCP_4_STREAMS = Measure("tcp_4_streams", ("-P", "4"), "bits_per_second")
UDP_64B = Measure("udp_64B", ("-u", "-l", "64", "-b", "0"), "packets_per_second")


class Iperf:
    """An iperf3 server in the upstream netns, and the client in the container's netns."""

    def __init__(self, env: Environment, client_pid: int, seconds: int):
        self.client_pid = client_pid
        self.seconds = seconds
        self.server: subprocess.Popen[bytes] | None = None
        env.teardown.add("iperf3 server", self.stop_server)
        self.start_server()

    def start_server(self) -> None:
        server = ["iperf3", "-s", "-B", UPSTREAM_SERVER, "-p", str(IPERF_PORT)]
        self.server = subprocess.Popen(
            ["ip", "netns", "exec", UPSTREAM_NETNS, "timeout", "7200", *server],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.3)

    def stop_server(self) -> None:
        if self.server is not None and self.server.poll() is None:
            self.server.terminate()  # `timeout` passes SIGTERM on to iperf3
            self.server.wait(timeout=10)

    def run(self, measure: Measure, seconds: int | None = None) -> dict[str, float]:
        seconds = seconds or self.seconds
        command = [
            *netns_exec(self.client_pid),
            "timeout",
            str(seconds + 15),
            "iperf3",
            "-c",
            UPSTREAM_SERVER,
            "-p",
            str(IPERF_PORT),
            "-t",
            str(seconds),
            "-A",
            "0,1",
            "--connect-timeout",
            "3000",
            "-J",
            *measure.iperf_args,
        ]
        error = ""
        for _attempt in range(3):
            output = subprocess.run(command, capture_output=True, text=True).stdout
            report = json.loads(output) if output.strip() else {}
            if "end" in report and "error" not in report:
                return measure.parse(report)
            error = report.get("error", "no report (iperf3 timed out)")
            self.stop_server()  # a server left busy by a dead client refuses the next one
            self.start_server()
        raise MeasurementFailed(error)

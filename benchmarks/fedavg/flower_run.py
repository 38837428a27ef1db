"""Flower 1.42's deployment engine, driven for the round benchmark.

``flower-superlink`` (HTTP Fleet API, 127.0.0.1:8000, ``--insecure
--disable-runtime-dependency-installation``), N ``flower-supernode`` with their own ``--port``
and ``--node-config partition-id=i``, then ``flwr run`` of the app against a federation defined
in ``$FLWR_HOME/config.toml``. Every process started here is stopped in ``close``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from fedavg.procfs import descendants, status_kb


class FlowerRun:
    """SuperLink + N SuperNodes + ``flwr run``; every process is stopped in ``close``."""

    def __init__(self, root: Path, app_dir: Path, n: int, params: int, rounds: int):
        self.root, self.app_dir, self.n, self.params, self.rounds = root, app_dir, n, params, rounds
        self.procs: list[subprocess.Popen] = []
        self.home = root / f"flwr-home-{n}"
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "config.toml").write_text(
            '[superlink.hearthbench]\naddress = "127.0.0.1:8000"\ninsecure = true\n'
        )
        bindir = str(Path(sys.executable).parent)
        self.env = {
            **os.environ,
            "FLWR_HOME": str(self.home),
            "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
        }
        self.out = root / f"flower-out-{n}"
        self.peak_rss = 0
        self.superlink_peak = 0

    def _start(self, args: list[str], log: str) -> subprocess.Popen:
        f = open(self.root / log, "wb")  # noqa: SIM115 - closed with the process
        p = subprocess.Popen(
            args,
            env=self.env,
            cwd=self.home,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs.append(p)
        return p

    def run(self, timeout: float = 600) -> dict:
        """Start the federation, run the app, wait for its result: round times and model."""
        link = self._start_federation()
        t0 = time.monotonic()
        self._flwr_run()
        done = Path(str(self.out) + ".json")
        sampler = threading.Thread(target=self._sample, args=(done,), daemon=True)
        sampler.start()
        while not done.exists():
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"Flower's run did not finish within {timeout}s")
            if link.poll() is not None:
                raise RuntimeError("flower-superlink exited")
            time.sleep(0.2)
        time.sleep(0.3)
        return self._result(done)

    def _start_federation(self) -> subprocess.Popen:
        """The SuperLink (returned) and the N SuperNodes, each in its own session."""
        bindir = Path(sys.executable).parent
        link = self._start(
            [
                str(bindir / "flower-superlink"),
                "--insecure",
                "--disable-runtime-dependency-installation",
            ],
            "superlink.log",
        )
        wait_port(8000, 60)
        for i in range(self.n):
            self._start(
                [
                    str(bindir / "flower-supernode"),
                    "--insecure",
                    "--superlink",
                    "127.0.0.1:8000",
                    "--port",
                    str(9200 + i),
                    "--node-config",
                    f"partition-id={i}",
                ],
                f"supernode-{i}.log",
            )
        return link

    def _flwr_run(self) -> None:
        """Submit the app's run to the SuperLink (``flwr run``); an error if it refuses."""
        bindir = Path(sys.executable).parent
        cfg = (
            f"num-server-rounds={self.rounds} num-clients={self.n} params={self.params} "
            f'out="{self.out}"'
        )
        run = subprocess.run(
            [str(bindir / "flwr"), "run", str(self.app_dir), "hearthbench", "--run-config", cfg],
            env=self.env,
            cwd=self.home,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if run.returncode != 0:
            raise RuntimeError(f"flwr run failed: {run.stdout[-800:]} {run.stderr[-800:]}")

    def _result(self, done: Path) -> dict:
        """What the ServerApp wrote: round ends (round times between them) and the model."""
        ends = {int(k): v for k, v in json.loads(done.read_text())["ends"].items()}
        rounds = [ends[r] - ends[r - 1] for r in range(1, self.rounds + 1)]
        with np.load(str(self.out) + ".npz") as z:
            model = [z[f"arr_{i}"] for i in range(len(z.files))]
        return {
            "clients": self.n,
            "round_s": rounds,
            "model": model,
            "peak_rss_all": self.peak_rss,
            "superlink_peak_rss": self.superlink_peak,
        }

    def _sample(self, done: Path) -> None:
        while not done.exists():
            total = 0
            for p in list(self.procs):
                for pid in {p.pid} | descendants(p.pid):
                    try:
                        total += status_kb(pid, "VmRSS") * 1024
                    except OSError:
                        pass
            self.peak_rss = max(self.peak_rss, total)
            try:
                self.superlink_peak = max(
                    self.superlink_peak, status_kb(self.procs[0].pid, "VmHWM") * 1024
                )
            except OSError:
                pass
            time.sleep(0.25)

    def close(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for p in self.procs:
                if p.poll() is None:
                    try:
                        os.killpg(p.pid, sig)
                    except ProcessLookupError:
                        pass
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and any(p.poll() is None for p in self.procs):
                time.sleep(0.1)
        for p in self.procs:
            p.wait(timeout=5)


def wait_port(port: int, timeout: float) -> None:
    """Until something accepts on 127.0.0.1:``port`` (TimeoutError after ``timeout`` s)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")

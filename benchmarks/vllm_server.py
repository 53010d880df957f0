"""A vLLM OpenAI server in a subprocess on a free loopback port: started, waited for, stopped (its whole process
group). Shared by `vllm_bench.py`, `gpu_vllm_check.py` and `tests/test_vllm_serving.py`; standard library only, so it
runs in any environment."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Optional


__all__ = ["VLLMServer", "free_port"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VLLMServer:
    """`python -m vllm.entrypoints.openai.api_server --model MODEL …` with its output in `log`.

    Args:
        python: The interpreter of the environment vLLM is installed in.
        model: Model folder.
        args: Further server arguments.
        env: The server's whole environment.
        log: File receiving its stdout and stderr.
        served_name: `--served-model-name` of the base model.
        cwd: Working folder (default: the log's folder).
    """

    def __init__(self, python: str, model: Path, args: list[str], env: dict[str, str], log: Path,
                 served_name: str = "base", cwd: Optional[Path] = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(log)
        command = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                   "--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(self.port), *args]
        with open(self.log, "w") as handle:
            self.proc = subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                         start_new_session=True, cwd=str(cwd or self.log.parent))

    def log_tail(self, chars: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def wait_ready(self, timeout: float = 600) -> None:
        """Returns once `/health` answers 200; raises if the server exits or `timeout` seconds pass."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited ({self.proc.returncode}):\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(1)
        raise TimeoutError(f"vLLM server not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def stop(self, timeout: float = 30) -> None:
        """Stops the server's process group: SIGTERM, then SIGKILL after `timeout` seconds."""
        if self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

HERE = Path(__file__).parent
CORRAL = [sys.executable, "-m", "corral"]
MASTER = "master-key-for-tests-0123456789"
HOOK_SECRET = "hook-secret-for-tests-0123456789"
SCRAPE_TOKEN = "scrape-token-for-tests-0123456789"
SCRAPER = 'metrics_key_env = "CORRAL_TEST_METRICS"\n'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    url: str
    db: Path
    process: subprocess.Popen[bytes]
    log: Path
    engine: str = "embedded"

    def key(self, tenant: str) -> str:
        """A new API key of ``tenant``, from the CLI, once the server knows it (servers
        reload keys every 2 s)."""
        done = subprocess.run([*CORRAL, "keys", "create", "--tenant", tenant],
                              env={**os.environ, "CORRAL_DB": str(self.db)},
                              capture_output=True, text=True, check=True)
        key = next(line for line in (done.stdout + done.stderr).split()
                   if line.startswith("sk-corral-"))
        deadline = time.monotonic() + 30
        while httpx.get(self.url + "/v1/runs", headers={"Authorization": f"Bearer {key}"},
                        timeout=10).status_code == 401:
            assert time.monotonic() < deadline, "the server never accepted the new key"
            time.sleep(0.05)
        return key

    def client(self, key: str | None = MASTER, **headers: str) -> httpx.Client:
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)


def start_server(folder: Path, *extra: str, config: str = "", server: str = SCRAPER) -> Server:
    """`corral serve` on a free port; ``server`` goes in its [server] table, ``config`` after
    the webhook's."""
    port = free_port()
    db = folder / "corral.db"
    log = folder / "serve.log"
    toml = folder / "corral.toml"
    toml.write_text('[server]\nmaster_key_env = "CORRAL_TEST_MASTER"\n'
                    f'workflows = ["{HERE / "api_workflows.py"}"]\n' + server +
                    '[server.webhooks.deploys]\nworkflow = "echo"\n'
                    'secret_env = "CORRAL_TEST_HOOK"\ntenant = "acme"\n' + config)
    env = {**os.environ, "CORRAL_TEST_MASTER": MASTER, "CORRAL_TEST_HOOK": HOOK_SECRET,
           "CORRAL_TEST_METRICS": SCRAPE_TOKEN, "CORRAL_CONFIG": str(toml)}
    with open(log, "wb") as out:
        process = subprocess.Popen([*CORRAL, "serve", "--port", str(port), "--db", str(db),
                                    *extra], env=env, stdout=out, stderr=subprocess.STDOUT,
                                   cwd=folder)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        if process.poll() is not None:
            raise AssertionError(f"corral serve exited: {log.read_text()}")
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"corral serve did not answer: {log.read_text()}")
        time.sleep(0.05)
    return Server(url, db, process, log)


def stop_server(server: Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(20)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()

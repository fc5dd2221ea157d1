"""`cipherfeed ui` as a user starts it: a loopback page that prints its tokened URL, serves the page,
answers the API only with that token, and refuses to listen anywhere but on loopback."""

from __future__ import annotations

import http.client
import os
import re
import subprocess
import sys

from cipherfeed.config import REPO_ROOT
from tests.conftest import mesh_pki


def test_cipherfeed_ui_serves_its_page_on_loopback_with_a_per_run_token(tmp_path):
    env = {"CIPHERFEED_CLIENT_HOME": str(tmp_path / "home"), **mesh_pki().env("device")}
    run = subprocess.Popen(
        [sys.executable, "-m", "cipherfeed.cli", "ui", "--port", "0"],
        cwd=REPO_ROOT, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        text=True,
    )  # fmt: skip
    try:
        assert run.stdout is not None
        line = run.stdout.readline()
        found = re.search(r"listening on port (\d+): open (http://127\.0\.0\.1:\d+/#token=([\w-]+))", line)
        assert found, line
        port, token = int(found.group(1)), found.group(3)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/", headers={"Host": f"127.0.0.1:{port}"})
        page = conn.getresponse()
        assert page.status == 200 and b"feed.js" in page.read()
        assert "frame-ancestors 'none'" in (page.getheader("Content-Security-Policy") or "")
        for given, want in ((token, 200), ("", 401)):
            conn.request("GET", "/api/status", headers={"Host": f"127.0.0.1:{port}", "X-Cipherfeed-Token": given})
            answer = conn.getresponse()
            answer.read()
            assert answer.status == want
        conn.close()
    finally:
        run.terminate()
        run.wait(timeout=20)
    refused = subprocess.run(
        [sys.executable, "-m", "cipherfeed.cli", "ui", "--listen-host", "0.0.0.0", "--port", "0"],
        cwd=REPO_ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert refused.returncode == 2 and "loopback only" in refused.stderr

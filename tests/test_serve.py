"""`plunkd serve` starting and stopping, as an operator sees it: every port bound before anything
starts (a busy port is one line naming it, and nothing else happens), where the API listens in the
log, and one line at a clean stop. Real processes on loopback."""

from __future__ import annotations

import signal
import socket

import pytest

from core.config import Config
from tests.servers import free_port, served_plunkd
from tests.test_cli_and_config import plunkd


@pytest.mark.parametrize("busy", ["http", "starttls"])
def test_a_busy_port_ends_start_up_with_one_line_naming_it_before_anything_starts(tmp_path, busy):
    ports = {"http": free_port(), "tls": free_port(), "starttls": free_port()}
    with socket.create_server(("127.0.0.1", ports[busy])):
        done = plunkd(tmp_path, "serve", env={
            "PLUNKD_SERVER_HTTP_PORT": str(ports["http"]), "PLUNKD_SMTP_HOST": "127.0.0.1",
            "PLUNKD_SMTP_TLS_PORT": str(ports["tls"]), "PLUNKD_SMTP_STARTTLS_PORT": str(ports["starttls"])})
    assert done.returncode == 1
    where, failure = done.stderr.splitlines()
    assert where.startswith("database: SQLite file "), done.stderr  # every command names its database
    assert failure == f"plunkd: cannot listen on 127.0.0.1:{ports[busy]}: address already in use"
    assert done.stdout == ""
    assert not list((tmp_path / "data").glob("*.sqlite3*")), \
        "no database made: no dispatcher process started (it would have made one), nothing served"


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_the_log_says_where_the_api_listens_and_one_line_at_a_clean_stop(tmp_path, stop_signal):
    with served_plunkd(tmp_path, {"PLUNKD_SERVER_PUBLIC_URL": "https://mail.example.org", "PLUNKD_SMTP_HOST": None,
                                  "PLUNKD_DELIVERY_ENABLED": "false"}, relay=True, graceful=True) as server:
        log = server.log()
        assert (f"plunkd API listening on http://127.0.0.1:{server.http_port} "
                f"(public URL, the base of links in emails: https://mail.example.org)") in log
        assert f"smtp relay on 127.0.0.1: {server.tls_port} (TLS), {server.starttls_port} (STARTTLS)" in log
        server.proc.send_signal(stop_signal)
        assert server.proc.wait(timeout=20) == 0
    stopped = [line for line in server.log().splitlines() if "stopped" in line]
    assert len(stopped) == 1 and stopped[0].endswith(f"stopped cleanly on {stop_signal.name}")
    assert "Traceback" not in server.log()


def test_both_listeners_default_to_loopback():
    config = Config()
    assert config.server.host == config.smtp.host == "127.0.0.1"

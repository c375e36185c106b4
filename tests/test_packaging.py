"""What a newcomer builds from: the Dockerfile ships every package pyproject installs, and docker-compose.yml
(two nodes on one PostgreSQL into Mailpit) sets only real config keys, to values the loader accepts.
(No Docker daemon runs in CI; these read the files the way the tools would.)"""

from __future__ import annotations

import dataclasses
import tomllib

import yaml

from core.config import Config, load_config
from tests.test_cli_and_config import ROOT


def env_names(section, prefix: str = "PLUNKD") -> set[str]:
    names = set()
    for field in dataclasses.fields(section):
        name = f"{prefix}_{field.name.upper()}"
        value = getattr(section, field.name)
        names |= env_names(value, name) if dataclasses.is_dataclass(value) else {name}
    return names


def test_the_image_copies_every_installed_package():
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    copied = {line.split()[1] for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith("COPY ")}
    assert {package.split(".")[0] for package in packages} <= copied


def test_compose_runs_two_nodes_on_one_postgresql_into_mailpit():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    nodes = {name: service for name, service in services.items() if service.get("build") == "."}
    assert len(nodes) == 2 and {"postgres", "mailpit"} <= set(services)
    known = env_names(Config())
    configs = {}
    for name, node in nodes.items():
        env = {key: str(value) for key, value in node["environment"].items()}
        assert set(env) <= known, set(env) - known
        configs[name] = load_config(env=env)  # raises, naming the key, on a bad value
        assert node["depends_on"]["postgres"]["condition"] == "service_healthy"
    first, second = configs.values()
    assert first.database_url == second.database_url and first.database_url.startswith("postgresql+asyncpg://")
    assert first.database_url.split("@")[1].startswith("postgres:5432/")
    assert first.delivery.transport == "smtp" and first.delivery.smtp.host == "mailpit"
    assert first.delivery.smtp.port == 1025
    assert first.delivery.rate_per_second == second.delivery.rate_per_second  # one shared rate
    assert first.server.link_secret == second.server.link_secret and len(first.server.link_secret) >= 32
    # one encryption key: each node opens the DKIM keys and webhook secrets another sealed (their data dirs differ)
    assert first.security.encryption_key == second.security.encryption_key != ""
    assert first.server.public_url != second.server.public_url
    host_ports = [port.split(":")[0] for node in nodes.values() for port in node["ports"]]
    assert len(host_ports) == len(set(host_ports))

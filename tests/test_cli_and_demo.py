"""The command line as a new user meets it: --help everywhere, and the demo end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from imagebridge.cli import main


@pytest.mark.parametrize(
    "args",
    [[], ["hub"], ["gateway"], ["demo"], ["directory"], ["directory", "add-institution"]],
)
def test_every_command_has_help(args: list[str]) -> None:
    result = CliRunner().invoke(main, [*args, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


def test_directory_commands_set_up_a_network(tmp_path: Path) -> None:
    config = tmp_path / "hub.toml"
    config.write_text('data_dir = "data"\n')
    runner = CliRunner()
    added = runner.invoke(
        main, ["directory", "add-institution", "--config", str(config), "SEG", "St E"]
    )
    assert added.exit_code == 0, added.output
    assert "IB_SEG" in added.output
    again = runner.invoke(
        main, ["directory", "add-institution", "--config", str(config), "SEG", "X"]
    )
    assert again.exit_code != 0 and "already in use" in again.output
    token = runner.invoke(main, ["directory", "add-gateway", "--config", str(config), "SEG", "gw1"])
    assert token.exit_code == 0 and token.output.startswith("ibg_")
    # Only the token's hash is kept.
    assert token.output.strip().encode() not in (tmp_path / "data" / "hub.db").read_bytes()


def test_demo_delivers_and_keeps_patient_data_out_of_logs(tmp_path: Path) -> None:
    folder = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "imagebridge", "demo", "--dir", str(folder), "--slices", "40"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "delivered:   40 instances" in result.stdout
    assert "report as Encapsulated PDF: yes" in result.stdout
    assert "RVH0042 (issuer RVH)" in result.stdout
    logs = list(folder.rglob("*.log"))
    assert len(logs) == 3  # the hub and two gateways
    for log in logs:
        text = log.read_text()
        for secret in ("SEG778899", "RVH0042", "9434765919", "DEMO^ALICE", "ALICE"):
            assert secret not in text, f"patient data in {log.name}"

import subprocess
import sys

import pytest

from hgf.cli import main

ARMS = ["fp16", "bitnet", "diff_only", "hgf", "hgf_std", "bitnet_diff"]


@pytest.mark.parametrize("arm", ARMS)
def test_info_every_arm(arm, capsys):
    assert main(["info", f"configs/{arm}.toml"]) == 0
    out = capsys.readouterr().out
    assert "[model]" in out and "parameters by component" in out and "i2" in out
    if arm.startswith("hgf"):
        assert "rank r = 8" in out


def test_info_bad_config_is_one_line_exit_2(capsys):
    assert main(["info", "configs/hgf.toml", "--hgf.rank=-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "hgf: error: command line: hgf.rank=-1: must be > 0 (or set hgf.target_overhead)"


def test_console_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "hgf", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "info" in out.stdout

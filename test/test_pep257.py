"""Docstring conventions over the whole package (ament_pep257, as ros2/examples runs it),
with the checks setup.cfg's [pydocstyle] section adds to ament's ignores."""
import configparser
import contextlib
import io
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def added_ignores() -> list[str]:
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    codes = config.get("pydocstyle", "add-ignore", fallback="")
    return [code.strip() for code in codes.replace("\n", ",").split(",") if code.strip()]


@pytest.mark.linter
@pytest.mark.pep257
def test_pep257():
    main = pytest.importorskip("ament_pep257.main", reason="ament_pep257 is not installed "
                               "(pip install ros-ament-pep257, or a ROS 2 install)")
    argv = [str(REPO)]
    if added_ignores():
        argv = ["--add-ignore", *added_ignores(), "--", *argv]
    report = io.StringIO()
    with contextlib.redirect_stdout(report):
        rc = main.main(argv=argv)
    assert rc == 0, f"pep257 errors (setup.cfg [pydocstyle]):\n{report.getvalue()}"

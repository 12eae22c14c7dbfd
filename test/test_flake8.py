"""flake8 over the whole package, as every ros2/examples package runs it (ament_flake8),
with the settings of setup.cfg's [flake8] section."""
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.flake8
@pytest.mark.linter
def test_flake8():
    main = pytest.importorskip("ament_flake8.main", reason="ament_flake8 is not installed "
                               "(pip install ros-ament-flake8, or a ROS 2 install)")
    rc, errors = main.main_with_errors(argv=["--config", str(REPO / "setup.cfg"), str(REPO)])
    assert rc == 0, f"{len(errors)} flake8 errors (setup.cfg [flake8]):\n" + "\n".join(errors)

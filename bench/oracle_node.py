"""A kp_ros node whose EfficientLoFTR matches are true ones, at the model's full cost
(bench only: bench_frontend.py --matches oracle).

    python bench/oracle_node.py <executable> --ros-args ...

Random weights match almost nothing on real or synthetic frames, so linking cannot be
measured with them. Here every EfficientLoFTR stage still runs on the random-init model
(backbone, transformer, fine pyramid: the compute, hence the load, is the real one's), and
its outputs are then replaced by test_eloftr_correctness's hand-made, shift-equivariant
features, whose matches are right (that file's docstring). The rest of the node is as
shipped.
"""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "test")]

import kp_ros.core.eloftr as eloftr  # noqa: E402
from test_eloftr_correctness import HandMadeFeatureMatcher  # noqa: E402


class CostlyOracleMatcher(eloftr.EfficientLoFTRStreamMatcher):
    """The model's stages for their cost, the hand-made features for the result."""

    def extract(self, preprocessed):
        real = super().extract(preprocessed)
        made = HandMadeFeatureMatcher.extract(self, preprocessed)
        made.residuals = (*made.residuals, real)  # the real features ride along
        return made

    def transform(self, features0, features1):
        self._real = (features0.residuals[2], features1.residuals[2])
        self._attended = super().transform(*self._real)
        return HandMadeFeatureMatcher.transform(self, features0, features1)

    def fine_maps(self, coarse0, coarse1, features0, features1):
        super().fine_maps(*self._attended, *self._real)
        return HandMadeFeatureMatcher.fine_maps(self, coarse0, coarse1, features0, features1)


eloftr.EfficientLoFTRStreamMatcher = CostlyOracleMatcher  # what the model registry loads

if __name__ == "__main__":
    executable = sys.argv[1]
    sys.argv = [executable, *sys.argv[2:]]
    runpy.run_module(f"kp_ros.nodes.{executable}", run_name="__main__")

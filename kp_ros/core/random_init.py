"""Random-init SuperPoint / EfficientLoFTR / LightGlue / SuperGlue models, saved like real checkpoints.

Used by the tests and, when pretrained weights cannot be reached, by the demo and the
benchmarks: the same ``from_pretrained`` path then loads them. ``full`` keeps the real
architecture sizes (so timings mean something); ``tiny`` is for fast tests.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import (EfficientLoFTRConfig, EfficientLoFTRForKeypointMatching,
                          EfficientLoFTRImageProcessor, LightGlueConfig,
                          LightGlueForKeypointMatching, LightGlueImageProcessor, SuperGlueConfig,
                          SuperGlueForKeypointMatching, SuperGlueImageProcessor, SuperPointConfig,
                          SuperPointForKeypointDetection, SuperPointImageProcessor)

SUPERPOINT_CONFIGS = {
    "full": {},
    "tiny": {"encoder_hidden_sizes": [8, 8, 16, 16], "decoder_hidden_size": 32,
             "descriptor_decoder_dim": 256},
}
ELOFTR_CONFIGS = {
    "full": {},
    "tiny": {"stage_num_blocks": [1, 1, 1, 1], "out_features": [16, 16, 32, 32],
             "stage_stride": [2, 1, 2, 2], "hidden_size": 32, "num_attention_layers": 1,
             "num_attention_heads": 8}  # rotary embedding needs 8 heads,
}

LIGHTGLUE_CONFIGS = {
    "full": {},
    "tiny": {"descriptor_dim": 64, "num_hidden_layers": 3, "num_attention_heads": 4},
}

# SuperGlue's hidden size is the descriptor size (256: SuperPoint's), tiny or not.
SUPERGLUE_CONFIGS = {
    "full": {},
    "tiny": {"keypoint_encoder_sizes": [32, 64], "gnn_layers_types": ["self", "cross"] * 2},
}


def _sane_init(model: torch.nn.Module, seed: int) -> None:
    """Kaiming-style weights keep activations O(1), so nothing decays into denormals
    (which made random ELoFTR ~8x slower) and scores are not all equal."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator)
                                    * (2.0 / fan_in) ** 0.5)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, torch.nn.BatchNorm2d):
                module.reset_running_stats()
                module.weight.fill_(1.0)
                module.bias.zero_()


def build_superpoint(size: str = "tiny", seed: int = 0) -> SuperPointForKeypointDetection:
    model = SuperPointForKeypointDetection(SuperPointConfig(**SUPERPOINT_CONFIGS[size]))
    _sane_init(model, seed)
    return model.eval()


def build_eloftr(size: str = "tiny", seed: int = 0) -> EfficientLoFTRForKeypointMatching:
    model = EfficientLoFTRForKeypointMatching(EfficientLoFTRConfig(**ELOFTR_CONFIGS[size]))
    _sane_init(model, seed)
    return model.eval()


def build_lightglue(size: str = "tiny", seed: int = 0) -> LightGlueForKeypointMatching:
    """LightGlue whose inner SuperPoint is ``build_superpoint(size, seed)``, weight for
    weight, so a kp_ros SuperPoint from ``save_random_superpoint(size, seed)`` gives the
    keypoints the reference re-detects. Defaults of the real config otherwise."""
    config = LightGlueConfig(keypoint_detector_config=SuperPointConfig(**SUPERPOINT_CONFIGS[size]),
                             **LIGHTGLUE_CONFIGS[size])
    model = LightGlueForKeypointMatching(config)
    _sane_init(model, seed + 1)
    model.keypoint_detector.load_state_dict(build_superpoint(size, seed).state_dict())
    return model.eval()


def build_superglue(size: str = "tiny", seed: int = 0) -> SuperGlueForKeypointMatching:
    """SuperGlue whose inner SuperPoint is ``build_superpoint(size, seed)``, weight for
    weight (as ``build_lightglue``). Defaults of the real config otherwise."""
    config = SuperGlueConfig(keypoint_detector_config=SuperPointConfig(**SUPERPOINT_CONFIGS[size]),
                             **SUPERGLUE_CONFIGS[size])
    model = SuperGlueForKeypointMatching(config)
    _sane_init(model, seed + 1)
    model.keypoint_detector.load_state_dict(build_superpoint(size, seed).state_dict())
    return model.eval()


def save_random_superpoint(out_dir: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """Write a random-init SuperPoint (+ its image processor config) to ``out_dir``."""
    out_dir = Path(out_dir)
    build_superpoint(size, seed).save_pretrained(out_dir)
    SuperPointImageProcessor().save_pretrained(out_dir)
    return out_dir


def save_random_eloftr(out_dir: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """Write a random-init EfficientLoFTR (+ its image processor config) to ``out_dir``."""
    out_dir = Path(out_dir)
    build_eloftr(size, seed).save_pretrained(out_dir)
    EfficientLoFTRImageProcessor().save_pretrained(out_dir)
    return out_dir


def save_random_lightglue(out_dir: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """Write a random-init LightGlue (+ its image processor config) to ``out_dir``."""
    out_dir = Path(out_dir)
    build_lightglue(size, seed).save_pretrained(out_dir)
    LightGlueImageProcessor().save_pretrained(out_dir)
    return out_dir


def save_random_superglue(out_dir: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """Write a random-init SuperGlue (+ its image processor config) to ``out_dir``."""
    out_dir = Path(out_dir)
    build_superglue(size, seed).save_pretrained(out_dir)
    SuperGlueImageProcessor().save_pretrained(out_dir)
    return out_dir

"""The models kp_ros can run: what a core model must offer, and one table of them.

ROS-free and torch-free at import (the launch file and the command-line parsers read
the table): each entry names its core class and its random-init builder by import path.

Adding a model is: its core module (a class whose constructor keywords are named like
its parameter specs, plus ``model``, ``device`` and ``precision``), its ``ParamSpec``s in
kp_ros/core/params.py (``NODES[<node>]``), one ``MODELS`` entry here, and its tests. The
nodes, process_bag's flags, model setup, the launch file and the demo loop over ``MODELS``.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from kp_ros.core import params
from kp_ros.core.params import ParamSpec


@runtime_checkable
class Model(Protocol):
    """What every core model offers the node base and the offline tools."""
    device: Any      # torch.device the model runs on
    model_id: str    # hub id or directory it was loaded from
    precision: Any   # kp_ros.core.precision.Precision: .note for logs, .warning if any
    params: Any      # a frozen dataclass with ``validated()``: the runtime settings

    def set_params(self, **changes) -> None:
        """Validate every change, then apply them at once (ValueError changes nothing)."""


@runtime_checkable
class Detector(Model, Protocol):
    def detect(self, image) -> dict:
        """uint8 HxW(x3) -> keypoints (N, 2) float32, scores (N,), descriptors (N, D)."""


@runtime_checkable
class Matcher(Model, Protocol):
    """A dense matcher of consecutive images (EfficientLoFTR)."""
    camera: Any  # geometry.CameraModel for 'essential' verification, or None

    def push(self, image) -> dict | None:
        """Match with the previous pushed image: keypoints0/1, scores, inliers; None first."""

    def match_pair(self, image0, image1) -> dict: ...

    def reset(self) -> None: ...


@dataclass(frozen=True)
class ModelEntry:
    """One available model: its node, its core class and random-init builder (import
    paths, loaded on first use), and what it consumes."""
    name: str          # the choice users type: superpoint, eloftr, ...
    kind: str          # "detector" | "matcher"
    node: str          # the node (and executable) that runs it; its specs: params.NODES[node]
    title: str         # for log lines: "SuperPoint", "EfficientLoFTR"
    core_class: str    # "module:Class"
    random_init: str   # "module:function(directory, size, seed) -> directory"
    consumes: str = "image"  # "image", or "keypoints" for a matcher of detected keypoints

    @property
    def specs(self) -> tuple[ParamSpec, ...]:
        return params.NODES[self.node]

    @property
    def default_model(self) -> str:
        return params.spec(self.node, "model").default

    @cached_property
    def model_class(self) -> type:
        return _load(self.core_class)

    @property
    def core_keywords(self) -> tuple[str, ...]:
        """The node parameters the core class takes as constructor keywords (no import)."""
        return tuple(s.name for s in self.specs if not s.node_only)

    @property
    def runtime_keywords(self) -> tuple[str, ...]:
        """The runtime-changeable parameters the core applies itself (``set_params``)."""
        return tuple(s.name for s in self.specs if s.runtime and not s.node_only)

    def core_kwargs(self, values: dict) -> dict:
        """Constructor keywords from a node's (or process_bag's) parameter values."""
        return {name: values[name] for name in self.core_keywords if name in values}

    def build(self, values: dict, **extra):
        """The core model for these parameter values (``extra``: non-parameter keywords)."""
        return self.model_class(**self.core_kwargs(values), **extra)

    def save_random(self, directory: str | Path, size: str = "tiny", seed: int = 0) -> Path:
        """Random-init weights saved like a checkpoint (tests, the demo's stand-in)."""
        return _load(self.random_init)(directory, size, seed=seed)


def _load(path: str):
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


MODELS: dict[str, ModelEntry] = {entry.name: entry for entry in (
    ModelEntry("superpoint", "detector", "superpoint_node", "SuperPoint",
               "kp_ros.core.superpoint:SuperPointDetector",
               "kp_ros.core.random_init:save_random_superpoint"),
    ModelEntry("eloftr", "matcher", "eloftr_node", "EfficientLoFTR",
               "kp_ros.core.eloftr:EfficientLoFTRStreamMatcher",
               "kp_ros.core.random_init:save_random_eloftr"),
    ModelEntry("lightglue", "matcher", "lightglue_node", "LightGlue",
               "kp_ros.core.lightglue:LightGlueStreamMatcher",
               "kp_ros.core.random_init:save_random_lightglue", consumes="keypoints"),
    ModelEntry("superglue", "matcher", "superglue_node", "SuperGlue",
               "kp_ros.core.superglue:SuperGlueStreamMatcher",
               "kp_ros.core.random_init:save_random_superglue", consumes="keypoints"),
)}


def model(name: str) -> ModelEntry:
    """The entry called ``name`` (ValueError listing the choices otherwise)."""
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}: one of {', '.join(MODELS)}") from None


def for_node(node: str) -> ModelEntry:
    """The entry run by ``node`` (superpoint_node -> superpoint)."""
    for entry in MODELS.values():
        if entry.node == node:
            return entry
    raise KeyError(f"no model runs in {node!r}")


def of_kind(kind: str) -> tuple[ModelEntry, ...]:
    return tuple(entry for entry in MODELS.values() if entry.kind == kind)

"""process_bag's options: the flags (model flags from kp_ros/core/params.py), the nodes'
ROS params file they default to, and the output topic names. process_bags takes the same.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from kp_ros.core import models, params
from kp_ros.core.package_files import PackageFileNotFound, package_file
from kp_ros.core.topics import default_prefix  # noqa: F401 - part of the options' API
from kp_ros.bags.reader import BagError
from kp_ros.bags.writer import STORAGES

DETECTOR, MATCHER = models.model("superpoint"), models.model("eloftr")
SUPERPOINT_MODEL = DETECTOR.default_model
ELOFTR_MODEL = MATCHER.default_model
MAX_FRAME_GAP = params.spec(MATCHER.node, "max_frame_gap").default
MATCHERS = models.of_kind("matcher")  # --matcher chooses one (default: MATCHER)

# The nodes' ROS parameters that map 1:1 to keywords of the core classes (the registry's).
DETECTOR_PARAMS = DETECTOR.core_keywords
MATCHER_PARAMS = MATCHER.core_keywords
# Parameters that only make sense live (subscription, diagnostics): no flag.
_LIVE_ONLY = {s.name for s in params.COMMON if s.node_only}


def _model_flags() -> dict:
    """flag -> (the nodes it sets, parameter): each model's ``model`` as --<name>-model, a
    parameter the models share as one flag, the others as their own."""
    flags = {}
    for entry in (DETECTOR, *MATCHERS):
        for spec in entry.specs:
            if spec.name in _LIVE_ONLY:
                continue
            flag = f"{entry.name}_model" if spec.name == "model" else spec.name
            nodes, _ = flags.get(flag, ((), None))
            flags[flag] = (nodes + (entry.node,), spec.name)
    return flags


# Model flags (each a parameter of kp_ros/core/params.py) -> (the nodes it sets, parameter).
MODEL_FLAGS = _model_flags()


def output_topics(prefix: str) -> dict[str, str]:
    prefix = "/" + prefix.strip("/") if prefix.strip("/") else ""
    return {"keypoints": f"{prefix}/keypoints", "matches": f"{prefix}/matches",
            "tracks": f"{prefix}/tracks", "feature": f"{prefix}/feature",
            "keypoints_debug": f"{prefix}/{DETECTOR.node}/debug_image",
            "matches_debug": f"{prefix}/{MATCHER.node}/debug_image"}


def load_params_file(path: str | Path, nodes=(DETECTOR.node, MATCHER.node)) -> tuple[dict, ...]:
    """The ros__parameters of ``nodes`` (default superpoint_node, eloftr_node) from a ROS 2
    params YAML.

    Node keys may carry a namespace (/camera/superpoint_node); ``/**`` applies to both.
    Parameters that only make sense live (QoS, debug_image, ...) are ignored.
    """
    import yaml

    try:
        document = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise BagError(f"cannot read params file {str(path)!r}: {err}") from err
    if not isinstance(document, dict):
        raise BagError(f"params file {str(path)!r}: expected a mapping of node names")
    found = {"**": {}, **{node: {} for node in nodes}}
    for key, entry in document.items():
        name = str(key).rstrip("/").split("/")[-1]
        if name in found and isinstance(entry, dict):
            found[name].update(entry.get("ros__parameters") or {})
    return tuple({**found["**"], **found[node]} for node in nodes)


def default_params_file() -> str | None:
    try:
        return str(package_file("config/matcher.yaml"))
    except PackageFileNotFound:
        return None


def resolve_options(args: argparse.Namespace) -> tuple[dict, dict, float]:
    """Detector kwargs, matcher kwargs and max_frame_gap: core defaults <- params file <- flags."""
    use_file = args.params_file and str(args.params_file).lower() != "none"
    matcher_entry = chosen_matcher(args)
    nodes = (DETECTOR.node, matcher_entry.node)
    files = load_params_file(args.params_file, nodes) if use_file else ({}, {})
    options = {DETECTOR.node: {"model": SUPERPOINT_MODEL} | files[0],
               matcher_entry.node: {"model": matcher_entry.default_model} | files[1]}
    for flag, (nodes, name) in MODEL_FLAGS.items():
        if getattr(args, flag, None) is not None:
            for node in nodes:
                if node in options:
                    options[node][name] = getattr(args, flag)
    detector = {k: v for k, v in options[DETECTOR.node].items() if k in DETECTOR_PARAMS}
    found = options[matcher_entry.node]
    matcher = {k: v for k, v in found.items() if k in matcher_entry.core_keywords}
    return detector, matcher, float(found.get("max_frame_gap", MAX_FRAME_GAP))


def chosen_matcher(args: argparse.Namespace):
    """The registry entry --matcher names (``--matcher`` alone, or an old True: the default)."""
    choice = getattr(args, "matcher", None)
    return models.model(choice) if isinstance(choice, str) else MATCHER


def add_model_flags(group) -> None:
    """One flag per MODEL_FLAGS entry: type, choices and text from the parameter spec."""
    metavars = {**{f"{name}_model": "ID_OR_DIR" for name in models.MODELS}, "device": "DEVICE",
                "max_frame_gap": "SECONDS", "ransac_reproj_threshold": "PX", "nms_radius": "PX"}
    for flag, (nodes, name) in MODEL_FLAGS.items():
        spec = params.spec(nodes[0], name)
        default = f"default {spec.default}"
        if spec.core_value != spec.default:
            default += f"; {spec.core_value} with --params-file none"
        text = f"{spec.description} ({default})".replace("%", "%%")
        if len(nodes) == 1 and name != "model":
            text = f"{models.for_node(nodes[0]).title}: {text}"
        kwargs = {"help": text}
        if spec.type is bool:
            kwargs.update(action=argparse.BooleanOptionalAction, default=None)
        elif spec.choices:
            kwargs.update(choices=spec.choices)
        else:
            kwargs.update(type=spec.type, metavar=metavars.get(flag, "N" if spec.type is int else "S"))
        group.add_argument("--" + flag.replace("_", "-"), **kwargs)


def build_parser(prog: str, description: str, positionals: bool = True) -> argparse.ArgumentParser:
    """The options; ``positionals=False`` leaves out input/output (process_bags adds its own)."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    if positionals:
        parser.add_argument("input", help="rosbag2 bag (directory, or a .db3/.mcap file)")
        parser.add_argument("output", help="output bag directory to create")
    parser.add_argument("--topic", help="image topic (default: the bag's only image topic)")
    parser.add_argument("--output-prefix", dest="prefix", default=None,
                        help="namespace of the output topics (default: the image topic's namespace)")
    parser.add_argument("--storage", choices=STORAGES, help="output storage (default: as the input)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output bag")
    parser.add_argument("--detector", action=argparse.BooleanOptionalAction, default=True,
                        help="run SuperPoint -> <prefix>/keypoints (default: on)")
    parser.add_argument("--matcher", nargs="?", const=MATCHER.name, default=MATCHER.name,
                        choices=tuple(entry.name for entry in MATCHERS),
                        help="the matcher -> <prefix>/matches: eloftr (dense, on the images; "
                             "the default), lightglue or superglue (sparse, on this run's "
                             "SuperPoint keypoints: need the detector)")
    parser.add_argument("--no-matcher", dest="matcher", action="store_const", const=None,
                        help="no matcher")
    parser.add_argument("--debug-images", action="store_true", help="also write the debug overlays")
    parser.add_argument("--tracks", action="store_true",
                        help="also write kp_ros/Tracks (track ids over frames, as track_node) on <prefix>/tracks")
    parser.add_argument("--vins", choices=params.VINS_LAYOUT_CHOICES[1:], default=None,
                        help="also write each Tracks as the sensor_msgs/PointCloud VINS-Fusion "
                             "('fusion') or VINS-Mono ('mono') reads, on <prefix>/feature (implies "
                             "--tracks; needs a CameraInfo beside the image topic; --stereo: "
                             "fusion adds the right camera's points from its CameraInfo)")
    association = params.spec("track_node", "association")
    radius = params.spec("track_node", "association_radius")
    parser.add_argument("--association", choices=association.choices, default=association.default,
                        help=f"with --tracks: how matches link keypoints (default "
                             f"{association.default}; see track_node)")
    parser.add_argument("--association-radius", type=float, default=radius.default, metavar="PX",
                        help=f"with --tracks: link radius in pixels (default {radius.default})")
    add_stereo_flags(parser.add_argument_group("stereo (a bag with left/right image_rect topics)"))
    parser.add_argument("--copy-input", action="store_true",
                        help="copy every input topic into the output bag too")
    parser.add_argument("--order", choices=("stamp", "receive"), default="stamp",
                        help="process frames by header stamp (default) or in recorded order")
    parser.add_argument("--params-file", metavar="YAML", default=default_params_file(),
                        help="the nodes' ROS 2 params file (superpoint_node/eloftr_node "
                             "ros__parameters); default: %(default)s; 'none': the core defaults")

    # None here = not given: the params file (or the core default) applies.
    models = parser.add_argument_group("models (default: the params file, or the core defaults)")
    add_model_flags(models)
    models.add_argument("--random-init-fallback", action="store_true",
                        help="if pretrained weights are unavailable, use RANDOM-INIT models "
                             "(meaningless features; for demos and pipeline tests) instead of failing")

    run = parser.add_argument_group("run")
    run.add_argument("--threads", type=int, default=None, metavar="N",
                     help="torch CPU threads (default: torch's); fix it for reproducible runs")
    run.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                     help="tqdm progress bar on stderr (default: on)")
    return parser


def add_stereo_flags(group) -> None:
    """--stereo, the two image topics and one flag per stereo parameter (kp_ros/core/params.py)."""
    group.add_argument("--stereo", action="store_true",
                       help="stereo pairs: left/right Keypoints, left Matches, StereoMatches "
                            "(disparity, depth) on <prefix>/stereo_matches; --tracks carry depth")
    group.add_argument("--left-topic", help="left image topic (default: the image topic with a "
                                            "'left' segment, e.g. /stereo/left/image_rect)")
    group.add_argument("--right-topic", help="right image topic (default: the one with 'right')")
    for spec in params.STEREO[1:]:
        group.add_argument("--" + spec.name.replace("_", "-"), type=float, default=spec.default,
                           metavar="S" if spec.name.endswith("tolerance") else "PX",
                           help=f"{spec.description} (default {spec.default})".replace("%", "%%"))


def stereo_params(args):
    """StereoParams from the stereo flags (ValueError naming a bad one)."""
    from kp_ros.core.stereo import StereoParams
    return StereoParams.from_values(vars(args))


def track_params(args):
    """TrackParams from --tracks (or --vins) / --association / --association-radius, or None."""
    if not (getattr(args, "tracks", False) or getattr(args, "vins", None)):
        return None
    from kp_ros.core.tracks import TrackParams
    return TrackParams(association=args.association,
                       association_radius=args.association_radius).validated()

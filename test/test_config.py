"""config/matcher.yaml and the nodes' declared parameters are the same set, same defaults."""
import yaml

from kp_ros.nodes.eloftr_node import EfficientLoFTRNode
from kp_ros.nodes.superpoint_node import SuperPointNode
from kp_ros.nodes.track_node import TrackNode
from kp_ros.ros.node_base import ros_params
from ros_helpers import PARAMS_FILE


def declared_params(node_class):
    """The parameters a node declares (its specs, with their ROS descriptors)."""
    return ros_params(node_class.SPECS)


def declared(node_class) -> dict:
    return {p.name: p.default for p in declared_params(node_class)}


def test_every_yaml_key_is_declared_and_every_declared_parameter_is_in_the_yaml():
    config = yaml.safe_load(PARAMS_FILE.read_text())
    assert set(config) == {"/**/superpoint_node", "/**/eloftr_node", "/**/lightglue_node",
                           "/**/superglue_node", "/**/track_node", "/**/frontend_node"}
    for key, node_class in (("/**/superpoint_node", SuperPointNode), ("/**/eloftr_node", EfficientLoFTRNode)):
        in_file = config[key]["ros__parameters"]
        assert set(in_file) == set(declared(node_class)), key
        for name, default in declared(node_class).items():
            assert in_file[name] == default, f"{key}.{name}: yaml {in_file[name]!r} != default {default!r}"
            assert type(in_file[name]) is type(default), f"{key}.{name} type"


def test_every_parameter_has_a_description_and_numeric_ones_a_range():
    for node_class in (SuperPointNode, EfficientLoFTRNode):
        for param in declared_params(node_class):
            descriptor = param.descriptor()
            assert len(descriptor.description) > 20, param.name
            if isinstance(param.default, (int, float)) and not isinstance(param.default, bool):
                assert descriptor.integer_range or descriptor.floating_point_range, param.name


def test_track_node_parameters_match_the_yaml():
    in_file = yaml.safe_load(PARAMS_FILE.read_text())["/**/track_node"]["ros__parameters"]
    declared_track = {p.name: p.default for p in declared_params(TrackNode)}
    assert in_file == declared_track
    assert all(type(in_file[k]) is type(v) for k, v in declared_track.items())
    for param in declared_params(TrackNode):
        descriptor = param.descriptor()
        assert len(descriptor.description) > 20, param.name
        if isinstance(param.default, (int, float)) and not isinstance(param.default, bool):
            assert descriptor.integer_range or descriptor.floating_point_range, param.name


def test_matcher_yaml_follows_the_parameter_spec():
    """Every yaml value: the spec's default, its type, within its range and choices."""
    from kp_ros.core import params

    config = yaml.safe_load(PARAMS_FILE.read_text())
    for node, specs in params.NODES.items():
        in_file = config[f"/**/{node}"]["ros__parameters"]
        assert set(in_file) == {p.name for p in specs}, node
        for spec in specs:
            value = in_file[spec.name]
            assert value == spec.default and type(value) is spec.type, f"{node}.{spec.name}"
            assert spec.checked(value) == value
            if spec.low is not None:
                assert spec.low <= value <= spec.high, f"{node}.{spec.name}"


def test_the_nodes_and_the_core_take_their_defaults_from_the_spec():
    import inspect
    from dataclasses import asdict

    from kp_ros.core import params
    from kp_ros.core.eloftr import EfficientLoFTRStreamMatcher
    from kp_ros.core.eloftr_params import EfficientLoFTRParams
    from kp_ros.core.stream_continuity import StreamContinuity
    from kp_ros.core.superpoint import SuperPointParams
    from kp_ros.core.tracks import TrackParams
    from kp_ros.offline import process_bag_cli as process_bag

    for node, node_class in (("superpoint_node", SuperPointNode), ("eloftr_node", EfficientLoFTRNode)):
        assert [(p.name, p.default, p.runtime) for p in declared_params(node_class)] \
            == [(p.name, p.default, p.runtime) for p in params.NODES[node]]
    assert [p.name for p in declared_params(TrackNode)] == [p.name for p in params.TRACK]
    # The core API keeps everything unless told (max_keypoints / max_matches -1); the nodes
    # publish a bounded top-k: both written in the spec, nowhere else.
    core_sp = params.defaults("superpoint_node", core=True)
    assert SuperPointParams() == SuperPointParams(**{k: core_sp[k] for k in (
        "keypoint_threshold", "nms_radius", "max_keypoints", "resize")})
    assert SuperPointParams().max_keypoints == -1 and core_sp["max_keypoints"] == -1
    assert params.defaults("superpoint_node")["max_keypoints"] == 1024
    core_lo = params.defaults("eloftr_node", core=True)
    core_conf = asdict(EfficientLoFTRParams())
    assert core_conf == {k: core_lo[k] for k in core_conf} and core_conf["max_matches"] == -1
    signature = inspect.signature(EfficientLoFTRStreamMatcher).parameters
    assert all(signature[k].default == v for k, v in core_conf.items())
    assert StreamContinuity().max_frame_gap == core_lo["max_frame_gap"] == process_bag.MAX_FRAME_GAP
    track = params.defaults("track_node")
    assert TrackParams() == TrackParams(**{k: track[k] for k in (
        "association_radius", "association", "inliers_only", "min_match_score")})
    assert process_bag.SUPERPOINT_MODEL == params.spec("superpoint_node", "model").default


def test_process_bag_model_flags_come_from_the_spec():
    from kp_ros.core import params
    from kp_ros.core import models
    from kp_ros.offline import process_bag_cli as process_bag

    parser = process_bag.build_parser()
    actions = {a.dest: a for a in parser._actions}
    for flag, (nodes, name) in process_bag.MODEL_FLAGS.items():
        spec = params.spec(nodes[0], name)
        assert actions[flag].default is None, flag  # not given: the params file decides
        assert tuple(actions[flag].choices or ()) == spec.choices, flag
    # Every model parameter the nodes share with process_bag has a flag.
    shared = set(process_bag.DETECTOR_PARAMS) | set(process_bag.MATCHER_PARAMS) \
        | {name for entry in models.of_kind("matcher") for name in entry.core_keywords} \
        | {"max_frame_gap"}
    assert shared == {name for _, name in process_bag.MODEL_FLAGS.values()}


def test_a_spec_rejects_what_the_node_rejects():
    import pytest

    from kp_ros.core import params

    assert params.spec("superpoint_node", "reliable_input").checked(True) == "reliable"
    with pytest.raises(ValueError, match="resize must be one of model, native"):
        params.spec("eloftr_node", "resize").checked("huge")
    with pytest.raises(KeyError, match="track_node has no parameter 'model'"):
        params.spec("track_node", "model")


def test_frontend_parameters_are_the_other_nodes_specs():
    """frontend_node declares the detector's, the matchers', the tracker's, the common and
    the stereo parameters as they are (model paths renamed <entry>_model), plus the matcher
    choice: every matcher of the registry."""
    from dataclasses import replace

    from kp_ros.core import models, params

    others = {p.name: p for node, specs in params.NODES.items() if node != "frontend_node"
              for p in specs if p.name != "model"} | {p.name: p for p in params.STEREO}
    frontend = {p.name: p for p in params.NODES["frontend_node"]}
    for entry in models.MODELS.values():
        assert frontend.pop(f"{entry.name}_model") == replace(
            params.spec(entry.node, "model"), name=f"{entry.name}_model")
    choice = frontend.pop("matcher")
    assert choice.choices == tuple(e.name for e in models.of_kind("matcher")) and not choice.runtime
    for name, spec in frontend.items():
        assert spec == others[name], name
    assert {"match_timeout", "max_pending", "fp16", "model"}.isdisjoint(frontend)
    assert set(p.name for p in params.STEREO) <= set(frontend)

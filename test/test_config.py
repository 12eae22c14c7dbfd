"""config/matcher.yaml and the nodes' declared parameters are the same set, same defaults."""
import yaml

from kp_ros.nodes.eloftr_node import EfficientLoFTRNode
from kp_ros.nodes.superpoint_node import SuperPointNode
from kp_ros.nodes.track_node import TrackNode
from kp_ros.ros.feature_node import COMMON_PARAMS
from ros_helpers import PARAMS_FILE


def declared(node_class) -> dict:
    return {p.name: p.default for p in node_class.MODEL_PARAMS + COMMON_PARAMS}


def test_every_yaml_key_is_declared_and_every_declared_parameter_is_in_the_yaml():
    config = yaml.safe_load(PARAMS_FILE.read_text())
    assert set(config) == {"/**/superpoint_node", "/**/eloftr_node", "/**/track_node"}
    for key, node_class in (("/**/superpoint_node", SuperPointNode), ("/**/eloftr_node", EfficientLoFTRNode)):
        in_file = config[key]["ros__parameters"]
        assert set(in_file) == set(declared(node_class)), key
        for name, default in declared(node_class).items():
            assert in_file[name] == default, f"{key}.{name}: yaml {in_file[name]!r} != default {default!r}"
            assert type(in_file[name]) is type(default), f"{key}.{name} type"


def test_every_parameter_has_a_description_and_numeric_ones_a_range():
    for node_class in (SuperPointNode, EfficientLoFTRNode):
        for param in node_class.MODEL_PARAMS + COMMON_PARAMS:
            descriptor = param.descriptor()
            assert len(descriptor.description) > 20, param.name
            if isinstance(param.default, (int, float)) and not isinstance(param.default, bool):
                assert descriptor.integer_range or descriptor.floating_point_range, param.name


def test_track_node_parameters_match_the_yaml():
    in_file = yaml.safe_load(PARAMS_FILE.read_text())["/**/track_node"]["ros__parameters"]
    declared_track = {p.name: p.default for p in TrackNode.PARAMS}
    assert in_file == declared_track
    assert all(type(in_file[k]) is type(v) for k, v in declared_track.items())
    for param in TrackNode.PARAMS:
        descriptor = param.descriptor()
        assert len(descriptor.description) > 20, param.name
        if isinstance(param.default, (int, float)) and not isinstance(param.default, bool):
            assert descriptor.integer_range or descriptor.floating_point_range, param.name

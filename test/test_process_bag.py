"""kp_ros.offline.process_bag_cli: every frame through tiny random models into an output bag."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import TUM_DIR, synthetic_frame, tum_frame_paths

from kp_ros.bags import messages as bag_messages
from kp_ros.bags import reader as bag_reader
from kp_ros.bags import writer as bag_writer
from kp_ros.bags.messages import COMPRESSED_TYPE, IMAGE_TYPE, KEYPOINTS_TYPE
from kp_ros.bags.reader import BagError
from kp_ros.offline import process_bag_cli as pb

T0 = 1_700_000_000_000_000_000
STEP = 100_000_000  # 10 Hz
TYPESTORE = bag_messages.kp_ros_typestore()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: these tiny models gain nothing from more, and on a shared CPU
    extra OpenMP threads only spin (10-100x slower)."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tiny_superpoint_dir, tiny_eloftr_dir):
    from kp_ros.core.eloftr import EfficientLoFTRStreamMatcher
    from kp_ros.core.superpoint import SuperPointDetector
    detector = SuperPointDetector(str(tiny_superpoint_dir), device="cpu", resize="native", max_keypoints=64)
    matcher = EfficientLoFTRStreamMatcher(str(tiny_eloftr_dir), device="cpu", resize="native",
                                          match_threshold=0.0)
    return detector, matcher


def frames(count=5, height=128, width=160):
    return [synthetic_frame(height, width, seed=0, shift=(2 * i, i)) for i in range(count)]


def image_bag(path, images, stamps=None, logs=None, storage="sqlite3", topic="/cam/image_raw",
              compressed=False, garbage=()):
    """An image bag; frame i has header stamp stamps[i] and receive time logs[i]
    (default 10 Hz from T0); frames listed in ``garbage`` carry undecodable data."""
    stamps = stamps or [T0 + i * STEP for i in range(len(images))]
    logs = logs or [s + 5_000_000 for s in stamps]
    msgtype = COMPRESSED_TYPE if compressed else IMAGE_TYPE
    with bag_writer.AtomicBagWriter(path, storage) as writer:
        connection = writer.add_connection(topic, msgtype, TYPESTORE)
        for i, (image, stamp, log) in enumerate(zip(images, stamps, logs)):
            header = bag_messages.header_msg(TYPESTORE, stamp, f"cam{i}")
            if compressed:
                data = b"\x89PNG garbage" if i in garbage else cv2.imencode(".png", image[:, :, ::-1])[1].tobytes()
                msg = bag_messages.compressed_image_msg(TYPESTORE, data, "png", header)
            else:
                msg = bag_messages.image_msg(TYPESTORE, image, "rgb8", header)
                if i in garbage:
                    msg.step = 1  # shorter than a row
            writer.write(connection, log, TYPESTORE.serialize_cdr(msg, msgtype))
    return path


def read_outputs(path):
    """topic -> [(log_ns, message, raw bytes)] in bag order."""
    reader = bag_reader.open_bag(path)
    out = {c.topic: [] for c in reader.connections}
    for connection, log_ns, data in reader.messages():
        out[connection.topic].append((log_ns, TYPESTORE.deserialize_cdr(data, connection.msgtype), bytes(data)))
    reader.close()
    return out


def stamps_of(messages, field="header"):
    return [bag_messages.stamp_to_ns(getattr(m, field).stamp if field == "header" else getattr(m, field))
            for _, m, _ in messages]


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
def test_every_frame_keypoints_and_paired_matches(tmp_path, models, storage):
    images = frames(5)
    image_bag(tmp_path / "in", images, storage=storage)
    summary = pb.process_bag(tmp_path / "in", tmp_path / "out", *models)
    assert bag_reader.detect_storage(tmp_path / "out") == storage  # same as the input by default
    assert (summary.frames, summary.processed, summary.keypoints_msgs, summary.matches_msgs) == (5, 5, 5, 4)
    assert not summary.rejected and not summary.resets
    out = read_outputs(tmp_path / "out")
    assert set(out) == {"/cam/keypoints", "/cam/matches"}
    stamps = [T0 + i * STEP for i in range(5)]
    keypoints, matches = out["/cam/keypoints"], out["/cam/matches"]
    assert stamps_of(keypoints) == stamps
    assert [log for log, _, _ in keypoints] == [s + 5_000_000 for s in stamps]  # receive times kept
    for _, msg, _ in keypoints:
        k = bag_messages.keypoints_from_msg(msg)
        assert (msg.height, msg.width, msg.descriptor_size) == (128, 160, 256)
        assert 0 < len(k["keypoints"]) <= 64 and msg.detector == models[0].model_id
        assert (k["keypoints"] >= 0).all() and (k["keypoints"][:, 0] < 160).all()
    assert stamps_of(matches) == stamps[1:]          # header: the newer frame
    assert stamps_of(matches, "stamp0") == stamps[:-1]  # stamp0: the frame before it
    assert [m.header.frame_id for _, m, _ in matches] == ["cam1", "cam2", "cam3", "cam4"]
    assert [m.frame_id0 for _, m, _ in matches] == ["cam0", "cam1", "cam2", "cam3"]
    assert [log for log, _, _ in matches] == [s + 5_000_000 for s in stamps[1:]]
    for _, msg, _ in matches:
        m = bag_messages.matches_from_msg(msg)
        assert len(m["keypoints0"]) == len(m["keypoints1"]) == len(m["scores"]) > 0
        assert len(m["inliers"]) == 0 and msg.matcher == models[1].model_id


def test_cli_is_deterministic_and_reads_params_file(tmp_path, tiny_superpoint_dir, tiny_eloftr_dir, capsys):
    image_bag(tmp_path / "in", frames(4), storage="mcap")
    params = tmp_path / "params.yaml"
    params.write_text(
        "/**:\n  ros__parameters:\n    resize: native\n    device: cpu\n"
        f"superpoint_node:\n  ros__parameters:\n    model: {tiny_superpoint_dir}\n    max_keypoints: 32\n"
        f"/cam/eloftr_node:\n  ros__parameters:\n    model: {tiny_eloftr_dir}\n    match_threshold: 0.0\n"
        "    geometric_verification: fundamental\n    use_compressed: false\n")
    runs = []
    for name in ("a", "b"):
        argv = ["--params-file", str(params), "--max-keypoints", "16", "--threads", "1",
                "--storage", "sqlite3", "--no-progress", str(tmp_path / "in"), str(tmp_path / name)]
        assert pb.main(argv) == 0
        runs.append(read_outputs(tmp_path / name))
    text = capsys.readouterr().out
    assert "4 read, 4 processed" in text and "keypoints/frame" in text
    assert bag_reader.detect_storage(tmp_path / "a") == "sqlite3"
    a, b = runs
    assert {t: [raw for _, _, raw in v] for t, v in a.items()} == {t: [raw for _, _, raw in v] for t, v in b.items()}
    assert all(0 < len(m.x) <= 16 for _, m, _ in a["/cam/keypoints"])  # the flag beat the file's 32
    assert all(len(m.inliers) == len(m.x0) for _, m, _ in a["/cam/matches"])  # verification ran


def test_tum_frames(tmp_path, models):
    paths = tum_frame_paths()
    if not paths:
        pytest.skip(f"shared TUM frames not found at {TUM_DIR}")
    from kp_ros.tools.images_to_bag import main as images_to_bag
    assert images_to_bag([str(TUM_DIR), str(tmp_path / "tum"), "--limit", "3", "--storage", "mcap"]) == 0
    summary = pb.process_bag(tmp_path / "tum", tmp_path / "out", *models)
    assert (summary.frames, summary.keypoints_msgs, summary.matches_msgs) == (3, 3, 2)
    out = read_outputs(tmp_path / "out")
    names = [int(p.stem.replace(".", "")) * 1000 for p in paths[:3]]
    assert stamps_of(out["/camera/keypoints"]) == names
    assert stamps_of(out["/camera/matches"], "stamp0") == names[:2]
    assert all((m.height, m.width) == (480, 640) for _, m, _ in out["/camera/matches"])


def test_stamp_order_and_backwards_stamp(tmp_path, models):
    """Stamp order pairs frames by stamp whatever the recording order; receive order (what
    a live node sees) resets the stream on the backwards stamp."""
    images = frames(4)
    stamps = [T0 + i * STEP for i in (0, 2, 1, 3)]
    image_bag(tmp_path / "in", [images[i] for i in (0, 2, 1, 3)], stamps=stamps,
              logs=[T0 + i for i in range(4)])
    by_stamp = pb.process_bag(tmp_path / "in", tmp_path / "s", *models)
    assert (by_stamp.matches_msgs, sum(by_stamp.resets.values())) == (3, 0)
    out = read_outputs(tmp_path / "s")
    assert sorted(zip(stamps_of(out["/cam/matches"], "stamp0"), stamps_of(out["/cam/matches"]))) == \
        [(T0 + i * STEP, T0 + (i + 1) * STEP) for i in range(3)]
    received = pb.process_bag(tmp_path / "in", tmp_path / "r", *models, order="receive")
    assert received.matches_msgs == 2 and sum(received.resets.values()) == 1
    assert "backwards" in next(iter(received.examples.values()))
    out = read_outputs(tmp_path / "r")
    assert list(zip(stamps_of(out["/cam/matches"], "stamp0"), stamps_of(out["/cam/matches"]))) == \
        [(stamps[0], stamps[1]), (stamps[2], stamps[3])]


def test_gap_and_size_change_reset_the_stream(tmp_path, models):
    images = frames(3) + frames(2, 96, 128)
    stamps = [T0, T0 + STEP, T0 + 9 * STEP + 10**9 * 5, T0 + 10 * STEP + 10**9 * 5, T0 + 11 * STEP + 10**9 * 5]
    image_bag(tmp_path / "in", images, stamps=stamps)
    summary = pb.process_bag(tmp_path / "in", tmp_path / "out", *models, max_frame_gap=1.0)
    reasons = " | ".join(summary.examples[k] for k in summary.resets)
    assert sum(summary.resets.values()) == 2 and "max_frame_gap" in reasons and "size changed" in reasons
    assert summary.matches_msgs == 2 and summary.keypoints_msgs == 5


@pytest.mark.parametrize("compressed", [True, False])
def test_undecodable_frame_is_skipped_and_counted(tmp_path, models, compressed, capsys):
    image_bag(tmp_path / "in", frames(4), compressed=compressed, garbage={1})
    summary = pb.process_bag(tmp_path / "in", tmp_path / "out", *models, log=print)
    assert sum(summary.rejected.values()) == 1 and summary.processed == 3
    assert "undecodable image" in next(iter(summary.examples.values()))
    assert "frame rejected" in capsys.readouterr().out
    out = read_outputs(tmp_path / "out")
    assert stamps_of(out["/cam/keypoints"]) == [T0, T0 + 2 * STEP, T0 + 3 * STEP]
    assert stamps_of(out["/cam/matches"], "stamp0") == [T0, T0 + 2 * STEP]  # skips the bad frame
    assert "rejected frames   1" in summary.text()


def test_debug_images_copy_input_and_single_model(tmp_path, models):
    image_bag(tmp_path / "in", frames(3), topic="/robot/cam/image_raw/compressed", compressed=True)
    summary = pb.process_bag(tmp_path / "in", tmp_path / "out", *models, debug_images=True,
                             copy_input=True, prefix="/features")
    out = read_outputs(tmp_path / "out")
    assert {t: len(v) for t, v in out.items()} == {
        "/robot/cam/image_raw/compressed": 3, "/features/keypoints": 3, "/features/matches": 2,
        "/features/superpoint_node/debug_image": 3, "/features/eloftr_node/debug_image": 2}
    assert summary.copied == 3
    debug = out["/features/eloftr_node/debug_image"][0][1]
    assert debug.encoding == "rgb8" and debug.height == 128 and debug.width >= 2 * 160 - 1
    pb.process_bag(tmp_path / "in", tmp_path / "kp_only", models[0], None)
    assert set(read_outputs(tmp_path / "kp_only")) == {"/robot/cam/keypoints"}
    pb.process_bag(tmp_path / "in", tmp_path / "one", None, models[1], storage="mcap")
    assert set(read_outputs(tmp_path / "one")) == {"/robot/cam/matches"}


def test_bad_inputs(tmp_path, capsys):
    image_bag(tmp_path / "in", frames(2, 32, 32))
    with bag_writer.AtomicBagWriter(tmp_path / "in2", "sqlite3") as writer:  # a bag without images
        header = bag_messages.header_msg(TYPESTORE, T0, "cam")
        msg = bag_messages.keypoints_msg(TYPESTORE, header, 1, 1, "x", np.zeros((0, 2)), np.zeros(0))
        writer.write(writer.add_connection("/kp", KEYPOINTS_TYPE, TYPESTORE), T0,
                     TYPESTORE.serialize_cdr(msg, KEYPOINTS_TYPE))
    cases = [
        (["--topic", "/nope"], "in", "'/nope' is not in the bag; image topics in the bag: /cam/image_raw"),
        (["--topic", "/kp"], "in2", "has type kp_ros/msg/Keypoints, not sensor_msgs/msg/Image"),
        ([], "in2", "no sensor_msgs/msg/Image or CompressedImage topics"),
        ([], "missing", "does not exist"),
        (["--no-detector", "--no-matcher"], "in", "nothing to do"),
        (["--params-file", str(tmp_path / "none.yaml")], "in", "cannot read params file"),
    ]
    for flags, name, message in cases:
        assert pb.main(flags + [str(tmp_path / name), str(tmp_path / "out")]) == 1, flags
        assert message in capsys.readouterr().err
    assert pb.main([str(tmp_path / "in"), str(tmp_path / "in2")]) == 1
    assert "exists already" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_truncated_bag_fails_cleanly(tmp_path, models):
    image_bag(tmp_path / "in", frames(4), storage="sqlite3")
    db3 = tmp_path / "in" / "in.db3"
    with open(db3, "r+b") as handle:
        handle.truncate(db3.stat().st_size // 2)
    with pytest.raises(BagError, match="truncated or corrupt"):
        pb.process_bag(tmp_path / "in", tmp_path / "out", *models)
    assert sorted(os.listdir(tmp_path)) == ["in"]  # no partial output, no temp directory


def test_interrupted_run_leaves_no_output(tmp_path, models, monkeypatch):
    image_bag(tmp_path / "in", frames(4))
    detector = models[0]
    calls = []

    def interrupt(image):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return type(detector).detect(detector, image)

    monkeypatch.setattr(detector, "detect", interrupt)
    with pytest.raises(KeyboardInterrupt):
        pb.process_bag(tmp_path / "in", tmp_path / "out", detector, models[1])
    assert sorted(os.listdir(tmp_path)) == ["in"]


def test_model_unavailable_exit_code_and_random_init_fallback(tmp_path, capsys):
    image_bag(tmp_path / "in", frames(2, 64, 64))
    argv = ["--superpoint-model", str(tmp_path / "no_such_model"), "--no-matcher", "--no-progress",
            "--device", "cpu", "--resize", "native", str(tmp_path / "in")]
    assert pb.main(argv + [str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "cannot load model" in err and "--random-init-fallback" in err
    assert not (tmp_path / "out").exists()
    assert pb.main(argv + [str(tmp_path / "out"), "--random-init-fallback"]) == 0
    assert "RANDOM-INIT" in capsys.readouterr().err
    keypoints = read_outputs(tmp_path / "out")["/cam/keypoints"]
    assert len(keypoints) == 2 and keypoints[0][1].detector.startswith("random-init(")


def test_default_prefix_and_option_resolution(tmp_path):
    assert pb.default_prefix("/camera/image_raw") == "/camera"
    assert pb.default_prefix("/camera/image_raw/compressed") == "/camera"
    assert pb.default_prefix("/image") == ""
    assert pb.output_topics("")["keypoints"] == "/keypoints"
    # Default: the nodes' config/matcher.yaml, so a bag gives what the live nodes give.
    args = pb.build_parser().parse_args(["in", "out", "--device", "cpu", "--max-matches", "7"])
    detector, matcher, gap = pb.resolve_options(args)
    assert detector["max_keypoints"] == 1024 and detector["device"] == "cpu"
    assert matcher["max_matches"] == 7 and matcher["match_threshold"] == 0.2
    assert gap == 1.5
    # --params-file none: the core defaults.
    args = pb.build_parser().parse_args(["in", "out", "--device", "cpu", "--max-matches", "7",
                                         "--params-file", "none"])
    detector, matcher, gap = pb.resolve_options(args)
    assert detector == {"model": pb.SUPERPOINT_MODEL, "device": "cpu"}
    assert matcher == {"model": pb.ELOFTR_MODEL, "device": "cpu", "max_matches": 7}
    assert gap == pb.MAX_FRAME_GAP


def test_help_and_module_entry_point():
    import subprocess
    result = subprocess.run([sys.executable, "-m", "kp_ros.offline.process_bag_cli", "--help"],
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert result.returncode == 0 and "--random-init-fallback" in result.stdout
    assert "header-stamp order" in result.stdout


def test_corrupt_weights_are_a_clear_error_not_a_traceback(tmp_path, capsys, tiny_superpoint_dir):
    """Weights that exist but cannot be read fail like missing ones (exit code 2, one line)."""
    import shutil
    broken = tmp_path / "broken_superpoint"
    shutil.copytree(tiny_superpoint_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    image_bag(tmp_path / "in", frames(2, 64, 64))
    argv = ["--superpoint-model", str(broken), "--no-matcher", "--no-progress", "--device", "cpu",
            str(tmp_path / "in"), str(tmp_path / "out")]
    assert pb.main(argv) == 2
    err = capsys.readouterr().err
    assert "cannot load model" in err and "SafetensorError" in err and str(broken) in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("output", ["same", "dot-slash", "symlink", "inside", "parent", "db3-dir"])
def test_output_that_is_or_overlaps_the_input_is_refused(tmp_path, capsys, monkeypatch, output):
    """Issue 13: `process_bag IN IN --overwrite` deleted the images and exited 0."""
    monkeypatch.chdir(tmp_path)
    image_bag(tmp_path / "data" / "in", frames(2, 32, 32))
    (tmp_path / "link").symlink_to(tmp_path / "data" / "in")
    before = {p: p.read_bytes() for p in (tmp_path / "data" / "in").iterdir()}
    source, target = {
        "same": ("data/in", "data/in"), "dot-slash": ("data/in", "./data//in/"),
        "symlink": ("data/in", "link"), "inside": ("data/in", "data/in/features"),
        "parent": ("data/in", "data"), "db3-dir": ("data/in/in.db3", "data/in"),
    }[output]
    assert pb.main([source, target, "--overwrite", "--no-matcher", "--random-init-fallback"]) == 1
    err = capsys.readouterr().err
    assert "process_bag: error:" in err and "input" in err and "overwrite" not in err.split("error:")[0]
    assert {p: p.read_bytes() for p in (tmp_path / "data" / "in").iterdir()} == before
    with pytest.raises(BagError, match="input"):
        pb.process_bag(tmp_path / source, tmp_path / target, object(), overwrite=True)
    assert {p: p.read_bytes() for p in (tmp_path / "data" / "in").iterdir()} == before


INTERRUPT_DURING_IMPORTS = """
import builtins, os, runpy, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # as from a terminal, even if inherited ignored
real_import, trigger = builtins.__import__, sys.argv[1]
def interrupting_import(name, *args, **kwargs):
    if name == trigger:  # Ctrl-C arrives while this module is being imported
        builtins.__import__ = real_import
        os.kill(os.getpid(), signal.SIGINT)
    return real_import(name, *args, **kwargs)
builtins.__import__ = interrupting_import
sys.argv = ["process_bag"] + sys.argv[2:]
runpy.run_module("kp_ros.offline.process_bag_cli", run_name="__main__")
"""


AS_FROM_A_TERMINAL = """
import runpy, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # a test runner may have it ignored
print("started", flush=True)  # past the interpreter's own start-up, where SIGINT just kills
sys.argv = ["process_bag"] + sys.argv[1:]
runpy.run_module("kp_ros.offline.process_bag_cli", run_name="__main__")
"""


@pytest.mark.parametrize("module", ["numpy", "kp_ros.bags.reader", "kp_ros.core.stream_continuity"])
def test_ctrl_c_during_the_imports_exits_130_with_one_line(tmp_path, module):
    """Issue 13: SIGINT in process_bag's first ~1.5 s (imports) printed a KeyboardInterrupt
    traceback and exited by the signal."""
    import subprocess
    image_bag(tmp_path / "in", frames(2, 32, 32))
    run = subprocess.run([sys.executable, "-c", INTERRUPT_DURING_IMPORTS, module,
                          str(tmp_path / "in"), str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 130, run.stderr
    assert "Traceback" not in run.stderr and "KeyboardInterrupt" not in run.stderr, run.stderr
    assert run.stderr.strip().splitlines() == ["process_bag: interrupted; no output bag written"]
    assert sorted(os.listdir(tmp_path)) == ["in"]


def test_ctrl_c_at_any_early_moment_exits_130(tmp_path):
    """A real SIGINT a little after start (imports, option and input checks, model load)."""
    import signal
    import subprocess
    import time
    image_bag(tmp_path / "in", frames(2, 32, 32))
    for delay in (0.3, 0.7, 1.0, 1.5):  # (a signal before the module starts is the harness's runpy)
        process = subprocess.Popen([sys.executable, "-c", AS_FROM_A_TERMINAL, str(tmp_path / "in"),
                                    str(tmp_path / "out"), "--random-init-fallback", "--no-progress"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert process.stdout.readline() == "started\n"
        time.sleep(delay)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
        assert process.returncode == 130, (delay, err)
        assert "Traceback" not in err, (delay, err)
        assert "process_bag: interrupted" in err.strip().splitlines()[-1]
    assert sorted(os.listdir(tmp_path)) == ["in"]


@pytest.mark.parametrize("error", ["enospc", "sqlite"])
def test_disk_full_is_one_clear_line(tmp_path, tiny_superpoint_dir, monkeypatch, capsys, error):
    """A full disk while writing ends in one line that says so, no traceback, no output."""
    import errno
    import sqlite3
    from kp_ros.bags import writer as bag_writer_module
    image_bag(tmp_path / "in", frames(2, 64, 96))

    def write(self, *args):
        if error == "enospc":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise sqlite3.OperationalError("database or disk is full")
    monkeypatch.setattr(bag_writer_module.AtomicBagWriter, "write", write)
    argv = [str(tmp_path / "in"), str(tmp_path / "out"), "--no-matcher", "--device", "cpu",
            "--superpoint-model", str(tiny_superpoint_dir), "--no-progress"]
    assert pb.main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "no space left on the device" in err, err
    assert err.strip().splitlines()[-1].startswith("process_bag: error: no space left"), err
    assert not (tmp_path / "out").exists()

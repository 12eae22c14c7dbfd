"""process_bag: every frame of a recorded image topic through SuperPoint and/or
EfficientLoFTR, into an output bag. Offline and deterministic; no ROS install needed.

Reads a rosbag2 bag (sqlite3 or MCAP) and one image topic (sensor_msgs/msg/Image or
CompressedImage, detected from the bag). Frames are processed in header-stamp order
(--order receive: in recorded order, as a live node would see a replay). Writes:

  <prefix>/keypoints                  kp_ros/msg/Keypoints, one per frame
  <prefix>/matches                    kp_ros/msg/Matches, each frame against the previous
                                      one (header = newer frame, stamp0 = older frame)
  <prefix>/superpoint_node/debug_image, <prefix>/eloftr_node/debug_image
                                      with --debug-images (sensor_msgs/Image rgb8)

<prefix> defaults to the image topic's namespace (/camera/image_raw -> /camera), the
names superpoint_node / eloftr_node publish under when launched in that namespace.
Header stamps are copied from the images; each output's bag (receive) time is its
input frame's. The message definitions go into the bag, so `ros2 bag info/play` work.

A frame where the stream breaks (stamp backwards or jumping more than --max-frame-gap,
size or encoding change) resets the matcher: no Matches for it. Undecodable frames are
skipped. Both are counted, with reasons, in the summary. The bag is written under a
temporary name and renamed when complete: a failed run leaves no partial output.

Options default to the nodes' config/matcher.yaml (so a bag gives what the live nodes
give); --params-file reads another ROS YAML (superpoint_node: ros__parameters: {...},
eloftr_node: ...), --params-file none uses the core models' defaults; flags override.

--stereo (a bag with left/right image topics and their camera_info, image_pipeline's
<ns>/left/image_rect, <ns>/right/image_rect): pairs by stamp (exact; --stereo-sync-tolerance)
and writes <ns>/keypoints (left), <ns>/right/keypoints, <ns>/matches (left camera),
<ns>/stereo_matches (kp_ros/msg/StereoMatches: disparity, depth) and, with --tracks,
<ns>/tracks with each keypoint's right observation and depth.

--vins fusion|mono (implies --tracks): <prefix>/feature, sensor_msgs/PointCloud per Tracks
as VINS-Fusion's / VINS-Mono's estimator reads /feature_tracker/feature (docs/vins.md);
needs the CameraInfo beside the image topic (--stereo fusion: both cameras').

Exit codes: 0 done, 1 bad input or option, 2 model weights unavailable, 130 interrupted.

    process_bag tum.bag tum_features.bag --topic /camera/image_raw --max-keypoints 1024
"""
from __future__ import annotations

import errno
import signal
import sys
import tempfile
import traceback
from pathlib import Path

try:  # ~1.5 s of imports: a Ctrl-C here is one line and exit 130, not a traceback
    from kp_ros.offline import options
    from kp_ros.offline.process_bag import process_bag
    from kp_ros.bags.reader import BagError, image_connections, open_bag
    from kp_ros.bags.writer import check_output_apart
    from kp_ros.core.signals import interrupts_held, interrupts_raised
    from kp_ros.offline.model_setup import deterministic_torch, load_models
    # Also the option names tests and process_bags read from here.
    from kp_ros.offline.options import (DETECTOR_PARAMS, ELOFTR_MODEL, MATCHER_PARAMS,
                                        chosen_matcher,
                                        MAX_FRAME_GAP, MODEL_FLAGS, SUPERPOINT_MODEL,
                                        default_prefix, output_topics, resolve_options,
                                        track_params)
    from kp_ros.offline.summary import Summary
except KeyboardInterrupt:
    print("process_bag: interrupted; no output bag written", file=sys.stderr)
    raise SystemExit(130) from None  # EXIT_INTERRUPTED, not defined yet

EXIT_OK, EXIT_INPUT, EXIT_MODEL, EXIT_INTERRUPTED = 0, 1, 2, 130


def build_parser(prog: str = "process_bag", description: str = __doc__,
                 positionals: bool = True):
    """process_bag's options; ``positionals=False`` leaves out input/output (process_bags adds its own)."""
    return options.build_parser(prog, description, positionals)


def fail(code: int, text: str) -> int:
    print(f"process_bag: error: {text}", file=sys.stderr)
    return code


def main(argv=None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # before the run started (option and input checks): no traceback
        print("process_bag: interrupted; no output bag written", file=sys.stderr)
        return EXIT_INTERRUPTED


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    if not (args.detector or args.matcher):
        return fail(EXIT_INPUT, "--no-detector and --no-matcher: nothing to do")
    if args.matcher and chosen_matcher(args).consumes == "keypoints" and not args.detector:
        return fail(EXIT_INPUT, f"--matcher {args.matcher} matches this run's SuperPoint keypoints: "
                                "it needs the detector")
    if args.stereo and args.matcher not in (None, "eloftr"):
        return fail(EXIT_INPUT, "--stereo runs with the dense matcher (eloftr) only")
    if (args.tracks or args.vins) and not (args.detector and args.matcher):
        return fail(EXIT_INPUT, f"{'--tracks' if args.tracks else '--vins'} needs both the detector "
                                f"and the matcher")
    if args.stereo and not (args.detector and args.matcher):
        return fail(EXIT_INPUT, "--stereo needs both the detector and the matcher")
    try:
        track_params(args)
        if args.stereo:
            options.stereo_params(args)
    except ValueError as err:
        return fail(EXIT_INPUT, str(err))
    try:
        detector_kwargs, matcher_kwargs, max_frame_gap = resolve_options(args)
        # Check the input before spending time on the models.
        reader = open_bag(args.input)
        try:
            if args.stereo:
                from kp_ros.offline.stereo_bag import stereo_topics
                for topic in stereo_topics(reader, args.left_topic, args.right_topic):
                    image_connections(reader, topic)
            else:
                image_connections(reader, args.topic)
        finally:
            reader.close()
        check_output_apart(args.input, args.output)
        if Path(args.output).exists() and not args.overwrite:
            raise BagError(f"output {args.output!r} exists already (use --overwrite to replace it)")
    except (BagError, ValueError) as err:
        return fail(EXIT_INPUT, str(err))

    # SIGTERM ends the run like Ctrl-C: the partial output is removed, not left behind.
    with interrupts_raised((signal.SIGTERM,)):
        try:
            return _run(args, detector_kwargs, matcher_kwargs, max_frame_gap)
        except KeyboardInterrupt:
            print(f"process_bag: interrupted; no output bag written ({args.output} untouched)",
                  file=sys.stderr)
            return EXIT_INTERRUPTED


class ModelLoadError(ValueError):
    """An invalid model option, raised while loading (not a problem of the bag)."""


def run_one(args, input_path, output_path, detector_kwargs: dict, matcher_kwargs: dict,
            max_frame_gap: float, *, progress: bool | None = None, on_frame=None, log=None) -> Summary:
    """One bag with process_bag's options (``args`` from build_parser(), resolved by
    resolve_options): load the models, process, return the summary. The one per-bag
    pipeline: process_bag's main and process_bags' Ray tasks both call it, so their
    outputs are byte-identical. Raises ModelUnavailableError, ModelLoadError, BagError,
    ValueError, or the model's own error; never leaves a partial output."""
    with tempfile.TemporaryDirectory(prefix="kp_ros_random_init_") as workdir, \
            deterministic_torch(args.threads):
        try:
            detector, matcher, detector_name, matcher_name = load_models(
                detector_kwargs if args.detector else None, matcher_kwargs if args.matcher else None,
                args.random_init_fallback, Path(workdir),
                matcher=chosen_matcher(args).name)
        except ValueError as err:
            raise ModelLoadError(str(err)) from err
        if getattr(args, "stereo", False):
            from kp_ros.offline.stereo_bag import process_stereo_bag
            return process_stereo_bag(
                input_path, output_path, detector, matcher, left_topic=args.left_topic,
                right_topic=args.right_topic, storage=args.storage, prefix=args.prefix,
                max_frame_gap=max_frame_gap, order=args.order,
                stereo_params=options.stereo_params(args),
                sync_tolerance=args.stereo_sync_tolerance, overwrite=args.overwrite,
                progress=args.progress if progress is None else progress, log=log,
                tracks=track_params(args), detector_name=detector_name,
                matcher_name=matcher_name, vins=getattr(args, "vins", None))
        return process_bag(
            input_path, output_path, detector, matcher, topic=args.topic, storage=args.storage,
            prefix=args.prefix, max_frame_gap=max_frame_gap, order=args.order,
            debug_images=args.debug_images, copy_input=args.copy_input,
            overwrite=args.overwrite, progress=args.progress if progress is None else progress,
            detector_name=detector_name, matcher_name=matcher_name, log=log, on_frame=on_frame,
            tracks=track_params(args), vins=getattr(args, "vins", None))


def disk_full(err: BaseException) -> str | None:
    """The disk-full error in ``err``'s chain (OSError ENOSPC from MCAP or the file system,
    sqlite3's 'database or disk is full'), as text; None when it is another failure."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return f"{errno.errorcode[err.errno]}: {err.strerror or err}"
        if "disk is full" in str(err):
            return f"{type(err).__name__}: {err}"
        err = err.__cause__ or err.__context__
    return None


def _run(args, detector_kwargs: dict, matcher_kwargs: dict, max_frame_gap: float) -> int:
    """main() after the argument checks: load the models, process, print the summary."""
    with interrupts_held():  # model_loading imports torch: see interrupts_held
        from kp_ros.core.model_loading import ModelUnavailableError
    from kp_ros.core.package_files import PackageFileNotFound

    try:
        summary = run_one(args, args.input, args.output, detector_kwargs, matcher_kwargs, max_frame_gap)
    except ModelUnavailableError as err:
        return fail(EXIT_MODEL, f"{err}\n(or pass --random-init-fallback to run the pipeline "
                                f"with random-init models)")
    except ModelLoadError as err:
        return fail(EXIT_INPUT, str(err))
    except (BagError, ValueError, PackageFileNotFound) as err:  # the last: an install without msg/
        return fail(EXIT_INPUT, f"{err}\nno output bag written ({args.output} untouched)")
    except Exception as err:  # noqa: BLE001 - a model failure: say so, leave no output
        full = disk_full(err)
        if full:
            return fail(EXIT_INPUT, f"no space left on the device while writing {args.output} "
                                    f"({full}); no output bag written")
        traceback.print_exc()
        return fail(EXIT_INPUT, f"processing failed; no output bag written ({args.output} untouched)")
    print(summary.text())
    return EXIT_OK


__all__ = ["BagError", "DETECTOR_PARAMS", "ELOFTR_MODEL", "EXIT_INPUT", "EXIT_INTERRUPTED",
           "EXIT_MODEL", "EXIT_OK", "MATCHER_PARAMS", "MAX_FRAME_GAP", "MODEL_FLAGS",
           "ModelLoadError", "SUPERPOINT_MODEL", "Summary", "build_parser", "default_prefix",
           "main", "output_topics", "process_bag", "resolve_options", "run_one"]


if __name__ == "__main__":
    raise SystemExit(main())

"""Summarise an encoding run's output and draw what was kept for one video.

    python jobs/inspect_shards.py OUT                      # per-run summary
    python jobs/inspect_shards.py OUT --png kept.png       # ... and a picture of the first video
    python jobs/inspect_shards.py OUT --video ID --png kept.png --max-frames 12

The summary lists the failed inputs and frames with their reasons; an output whose every input failed
(no shards) is summarised too. For a temporal method (holitom, a row per temporal window) it counts
windows and source frames, and the picture draws source frames with each window's static tokens
outlined (in their own colour) on every frame of the window.

Exit status: 0 when the summary (and the picture) was made, 2 when OUT is not an output this reader can
open or holds no tokens for the video to draw, 4 when a committed file cannot be read back whole
(named), 1 when the picture cannot be made.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.store import DamagedOutputError  # noqa: E402
from pipeline.reader import MixedShardsError, ShardFormatError, TokenReader  # noqa: E402
from pipeline.render import render_video  # noqa: E402
from pipeline.report import summarize  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", help="the --output directory of an encoding run")
    parser.add_argument("--video", help="video_id to draw (default: the first video in the shards)")
    parser.add_argument("--png", help="write the picture of --video to this PNG file")
    parser.add_argument("--max-frames", type=int, default=8, help="frames drawn, spread uniformly over the video "
                        "(temporal outputs: source frames, over all the frames the windows cover)")
    parser.add_argument("--panel", type=int, default=256, help="pixels per drawn view")
    args = parser.parse_args()
    try:
        reader = TokenReader(args.output)
        report = summarize(reader)
    except (FileNotFoundError, MixedShardsError, ShardFormatError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except DamagedOutputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 4
    for line in report.lines():
        print(line)
    if args.video and args.video not in reader:
        print(f"error: no tokens for video {args.video!r} in {args.output}", file=sys.stderr)
        return 2
    if args.png:
        if not args.video and len(reader) == 0:
            print(f"error: no video to draw: no input produced tokens in {args.output}", file=sys.stderr)
            return 2
        video_id = args.video or reader.video_ids()[0]
        try:
            figure = render_video(reader, video_id, args.png, max_frames=args.max_frames, panel=args.panel)
        except DamagedOutputError as error:
            print(f"error: {error}", file=sys.stderr)
            return 4
        except (OSError, RuntimeError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        print(f"wrote {args.png} ({figure.width}x{figure.height}) for {video_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

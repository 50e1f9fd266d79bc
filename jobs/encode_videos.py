"""Encode videos into PruMerge-reduced vision-token shards (Parquet). See README.md for every flag."""

import sys

from cli import main

if __name__ == "__main__":
    sys.exit(main("video", __doc__))

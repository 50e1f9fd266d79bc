"""Encode images (JPEG/PNG/WebP; AnyRes tiles by default) into PruMerge-reduced vision-token shards (Parquet)."""

import sys

from cli import main

if __name__ == "__main__":
    sys.exit(main("image", __doc__, defaults={"anyres": True}))

"""Pack images into WebDataset tar shards for pretraining (see vitreg/data/shards.py for the format).

    # ImageNet-style tree (root/<class>/<image>): labels from the sorted folder names, 1000 images a shard
    python scripts/make_shards.py /data/imagenet/train shards/in1k --prefix train
    # an unlabelled folder, downscaled so the long side is at most 512 px, shards of at most 500 MB
    python scripts/make_shards.py /data/photos shards/photos --resize-long-side 512 --max-size-mb 500
    # a file list, one "path<TAB>label" (or "path label", or just "path") per line
    python scripts/make_shards.py lists/val.txt shards/val --prefix val --kind list --workers 8

SOURCE's kind is detected: a file is a list, a folder with images at its top level is flat, a folder of
subfolders is a tree; --kind overrides. Unreadable images are skipped and listed in OUT_DIR/summary.json;
the exit code is 0 unless no image at all could be written.
"""

from __future__ import annotations

import argparse
import os
import sys

from vitreg.data.shards import KINDS, find_images, write_shards


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="image folder (tree or flat) or text file list")
    parser.add_argument("out_dir", help="where the shards, classes.json and summary.json go")
    parser.add_argument("--kind", choices=KINDS, default=None, help="source layout (default: detected)")
    parser.add_argument("--prefix", default="train", help="shard names: PREFIX-000000.tar, ...")
    parser.add_argument("--max-count", type=int, default=1000, help="images per shard at most")
    parser.add_argument("--max-size-mb", type=float, default=None, help="shard file size limit (1 MB = 10^6 B)")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed; same seed, same shards")
    parser.add_argument("--resize-long-side", type=int, default=None, help="downscale larger images to this")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality for re-encoded images")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decoding processes")
    parser.add_argument("--overwrite", action="store_true", help="replace existing PREFIX-*.tar shards")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    try:
        items, class_names = find_images(args.source, kind=args.kind)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not items:
        print(f"error: no images found in {args.source}", file=sys.stderr)
        return 1
    classes = f" in {len(class_names)} classes" if class_names is not None else " (unlabelled)"
    print(f"found {len(items):,} images{classes} in {args.source}", flush=True)

    max_bytes = round(args.max_size_mb * 1e6) if args.max_size_mb else None
    try:
        summary = write_shards(
            items,
            args.out_dir,
            prefix=args.prefix,
            max_count=args.max_count,
            max_bytes=max_bytes,
            seed=args.seed,
            resize_long_side=args.resize_long_side,
            jpeg_quality=args.quality,
            workers=args.workers,
            class_names=class_names,
            progress=not args.quiet,
            overwrite=args.overwrite,
        )
    except FileExistsError as e:
        print(f"error: {e}; rerun with --overwrite to replace them", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(summary)
    if summary.images_written == 0:
        print(f"error: none of the {len(items):,} images could be read (see above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Make a class-balanced subset of an ImageFolder data root as a tree of symbolic links.

    subset.py SRC DST --train N --test M [--seed S]

SRC holds train/<class>/ and test/<class>/; DST gets the same layout with at most N (train) and M (test)
images per class, chosen at random with the seed (0 = all). The tree is built beside DST and renamed into
place, so an interrupted run leaves no half-made subset. Only data preparation: every model step of a study
is a resopt command.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
from pathlib import Path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def pick(folder: Path, limit: int, rng: random.Random) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if limit and limit < len(files):
        files = sorted(rng.sample(files, limit))
    return files


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    ap.add_argument("--train", type=int, default=0, help="images per class in train/ (0: all)")
    ap.add_argument("--test", type=int, default=0, help="images per class in test/ (0: all)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    src = args.src.resolve()
    for split in ("train", "test"):
        if not (src / split).is_dir():
            print(f"error: {src / split} is not a folder (expected an ImageFolder root with train/ and test/)",
                  file=sys.stderr)
            return 2
    tmp = args.dst.with_name(args.dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    rng = random.Random(args.seed)
    counts = {}
    for split, limit in (("train", args.train), ("test", args.test)):
        n = 0
        for cls in sorted(p for p in (src / split).iterdir() if p.is_dir()):
            out = tmp / split / cls.name
            out.mkdir(parents=True)
            for f in pick(cls, limit, rng):
                os.symlink(f, out / f.name)
                n += 1
        counts[split] = n
    shutil.rmtree(args.dst, ignore_errors=True)
    tmp.rename(args.dst)
    print(f"{args.dst}: {counts['train']} train and {counts['test']} test images from {src}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

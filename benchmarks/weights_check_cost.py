"""Cost of the backbone identity check on every load, for a full-size Meta-format file (default: 7B, 26.9 GB).

    python benchmarks/weights_check_cost.py --backbone dinov3_vit7b16 --workdir /big/disk

Prints a table: the first full SHA-256 (once per file), the cached check every later load runs (stat key + 1 MiB
sample), the same with the page cache dropped (when the kernel lets us), and the whole trainer preflight
(check_weight_file: memory-mapped keys/shapes/variant + cached hash). The file is deleted afterwards.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from load_memory import write_big_checkpoint


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - start, out


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="dinov3_vit7b16")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="weights_check_"))
    os.environ["XDG_CACHE_HOME"] = str(workdir / "cache")
    from nnunet_dino.backbones import check_weight_file
    from nnunet_dino.backbones.hash_cache import cached_sha256, file_sha256

    t_write, path = timed(write_big_checkpoint, args.backbone, workdir)
    size = path.stat().st_size / 2**30
    rows = [("write the test file (not part of a load)", t_write)]
    try:
        t_full, sha = timed(file_sha256, path)
        rows.append(("first use: full SHA-256, then cached", t_full))
        t_cached, again = timed(cached_sha256, path)
        assert again == sha
        rows.append(("every later load: stat key + 1 MiB sample (warm)", t_cached))
        if drop_page_cache():
            t_cold, again = timed(cached_sha256, path)
            assert again == sha
            rows.append(("every later load, page cache dropped", t_cold))
        t_pre, _ = timed(check_weight_file, args.backbone, path)
        rows.append(("trainer preflight (keys/shapes/variant + cached hash)", t_pre))
    finally:
        path.unlink(missing_ok=True)
    print(f"{args.backbone}: {path.name}, {size:.1f} GiB")
    print("| step | seconds |\n| --- | --- |")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.3f} |")


if __name__ == "__main__":
    main()

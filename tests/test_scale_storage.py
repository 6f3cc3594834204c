"""Storage a user can plan: `cache info` and `extract-features --dry-run` state bytes per row and
the projected size for N rows, and the estimate matches what a cache really takes."""
from __future__ import annotations

import re

import numpy as np
from typer.testing import CliRunner

from blitext.cache.manifest import load_manifest
from blitext.cache.storage import cache_bytes, estimated_row_bytes, projection_line
from blitext.cli.main import app
from tests.test_cache import build
from tests.test_extract import write_image_folder

WIDE = {"COLUMNS": "200"}


def test_estimate_matches_the_bytes_a_cache_takes(tmp_path):
    n = 20_000
    keys = [f"COCO_train2014_{i:012d}" for i in range(n)]  # 26-byte keys
    rows = dict(zip(keys, np.zeros((n, 4, 8), np.float16)))
    manifest = build(tmp_path / "c", rows, shard_size=10_000)
    per_row = cache_bytes(tmp_path / "c", manifest["shards"]) / n
    assert abs(estimated_row_bytes((4, 8), "float16", 26) / per_row - 1) < 0.05, per_row


def test_cache_info_prints_bytes_per_row_and_projections(tmp_path):
    build(tmp_path / "c", {f"img-{i}": np.zeros((4, 6), np.float16) for i in range(7)})
    result = CliRunner().invoke(app, ["cache", "info", str(tmp_path / "c"), "--rows", "2000000"], env=WIDE)
    assert result.exit_code == 0, result.output
    per_row = cache_bytes(tmp_path / "c", load_manifest(tmp_path / "c")["shards"]) / 7
    assert f"{per_row:,.0f} B (shards, their sidecars, the key index)" in result.output
    assert projection_line(per_row, (2_000_000,)) in result.output


def test_extract_dry_run_projects_sizes_and_writes_nothing(tmp_path, vision_folders):
    data = write_image_folder(tmp_path / "imgs", 3)
    result = CliRunner().invoke(app, ["extract-features", "--data", str(data), "--vision-encoder",
                                      str(vision_folders["vit"]), "--out", str(tmp_path / "out"), "--dry-run"], env=WIDE)
    assert result.exit_code == 0, result.output
    per_row = int(re.search(r"about ([\d,]+) B/row", result.output).group(1).replace(",", ""))
    assert "3 images" in result.output and "129,000,000 rows" in result.output
    assert projection_line(per_row, (4_000_000,)) in result.output
    assert not (tmp_path / "out").exists()

"""``dist-unlearn bench contrastive`` end to end at tiny sizes: the JSON has its fields, the numbers are
positive, and the tiled loss peaks below the full loss. No timing assertions (memory/speed claims belong to
the benchmark's own output, not to unit tests)."""

from __future__ import annotations

import argparse
import json

import pytest

from dist_unlearn.bench import contrastive
from dist_unlearn.cli import main


def test_bench_quick_parts_a_and_d(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", "contrastive", "--quick", "--parts", "a,d", "--batch", "8", "--chunk", "4", "--repeats", "1"]
    argv += ["--loss-sizes", "512,2048", "--tile-size", "128", "--out", str(out)]
    assert main(argv) == 0
    data = json.loads(out.read_text())
    assert not (tmp_path / "bench.json.tmp").exists()
    assert data["mode"] == "quick"
    machine = data["machine"]
    assert machine["cpu_count"] > 0 and machine["torch"] and machine["device"] in ("cpu", "cuda")

    a = data["gradcache_overhead"]
    assert a["batch"] == 8 and a["chunk"] == 4
    assert a["plain_s"] > 0 and a["gradcache_s"] > 0 and a["gradcache_over_plain"] > 0
    assert a["model"]["parameters"] > 0

    rows = data["tiled_loss_memory"]
    assert [row["batch"] for row in rows] == [512, 2048]
    for row in rows:
        for loss in ("full", "tiled"):
            assert "error" not in row[loss], row[loss]
            assert row[loss]["peak_increase_mib"] > 0 and row[loss]["seconds"] > 0
    largest = rows[-1]
    assert largest["tiled"]["peak_increase_mib"] < largest["full"]["peak_increase_mib"]
    assert "(d) InfoNCE loss memory" in capsys.readouterr().out


def test_bench_rejects_unknown_part(capsys):
    assert main(["bench", "contrastive", "--parts", "a,z"]) == 2
    assert "--parts" in capsys.readouterr().err


def test_resolve_fills_mode_defaults():
    parser = argparse.ArgumentParser()
    contrastive.add_arguments(parser)
    quick = contrastive.resolve(parser.parse_args(["--quick", "--device", "cpu"]))
    full = contrastive.resolve(parser.parse_args(["--device", "cpu", "--mem-batches", "64,128"]))
    assert quick.loss_sizes == [2048, 4096, 8192] and quick.parts == ["a", "b", "c", "d"]
    assert full.loss_sizes == [16384, 32768, 65536] and full.mem_batches == [64, 128]
    with pytest.raises(ValueError, match="--loss-sizes"):
        contrastive.resolve(parser.parse_args(["--loss-sizes", "1k"]))


_PROBE_SCRIPT = """
import json
from dist_unlearn.bench.memory import PeakProbe
probe = PeakProbe("cpu")
probe.start()
block = bytearray(64 * 1024 * 1024)
block[::4096] = b"x" * len(block[::4096])  # touch every page
print(json.dumps(probe.report()))
"""


def test_peak_probe_sees_an_allocation():
    """In a fresh process: where the kernel refuses to reset VmHWM (seen in CI's sandbox) the probe falls
    back to the high-water mark so far, which in a long-lived test process may already exceed 64 MiB."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _PROBE_SCRIPT], capture_output=True, text=True, timeout=120, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["peak_increase_mib"] > 32

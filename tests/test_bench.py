"""``dist-unlearn bench contrastive`` end to end at tiny sizes: the JSON has its fields, the numbers are
positive, and the tiled loss peaks below the full loss. No timing assertions (memory/speed claims belong to
the benchmark's own output, not to unit tests)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

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


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_bench_refuses_cuda_without_a_gpu(capsys):
    """``--device cuda`` on a machine without a GPU fails before any work, naming the fix."""
    assert main(["bench", "contrastive", "--device", "cuda", "--parts", "d"]) == 2
    assert "--device cuda: no CUDA device is available" in capsys.readouterr().err


def test_bench_refuses_an_indexed_device(capsys):
    """Timing syncs and peak probes use the current GPU: ``cuda:1`` is refused with the CUDA_VISIBLE_DEVICES fix."""
    assert main(["bench", "contrastive", "--device", "cuda:1", "--parts", "d"]) == 2
    assert "CUDA_VISIBLE_DEVICES" in capsys.readouterr().err


def test_bf16_steppers_match_each_other():
    """``--bf16``: the plain and GradCache steps under bfloat16 autocast give float32 gradients that agree within
    bf16 rounding (1e-2 relative, a few ``u = 2^-8``: each chunk's forward rounds like the whole batch's)."""
    from dist_unlearn.bench.steps import TINY_BERT, Stepper, load_encoder, load_tokenizer, make_batch

    queries, docs = make_batch(load_tokenizer(), 8, 16, "cpu")
    grads = {}
    for method in ("plain", "gradcache"):
        model = load_encoder(TINY_BERT)[0].eval()  # no dropout: the two methods see the same network
        loss = Stepper(method, model, 4, torch.bfloat16).gradient(queries, docs)
        assert torch.isfinite(loss)
        grads[method] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert all(g.dtype == torch.float32 for g in grads["plain"].values())
    scale = max(g.abs().max().item() for g in grads["plain"].values())
    err = max((grads["gradcache"][n] - g).abs().max().item() for n, g in grads["plain"].items()) / scale
    assert err < 1e-2, err


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


def test_bench_memory_writes_loss_and_step_json(tmp_path, capsys):
    """``bench memory`` at smoke-test sizes: every point measured (fresh processes), the keys exist, and the
    plain and chunked losses agree with each other and with ``ln V`` (near-zero logits: softmax ≈ uniform)."""
    import math

    out = tmp_path / "memory.json"
    argv = ["bench", "memory", "--parts", "loss,step", "--tokens", "256", "--hidden", "64", "--vocabs", "4096"]
    argv += ["--heads", "frozen", "--models", "tiny", "--lora-r", "4", "--out", str(out), "--device", "cpu"]
    assert main(argv) == 0
    data = json.loads(out.read_text())
    assert not (tmp_path / "memory.json.tmp").exists()
    assert data["machine"]["cpu_count"] > 0

    (row,) = data["lm_loss_memory"]
    assert (row["tokens"], row["hidden"], row["vocab"], row["head"]) == (256, 64, 4096, "frozen")
    for method in ("plain", "chunked"):
        assert "error" not in row[method], row[method]
        assert row[method]["peak_increase_mib"] >= 0 and row[method]["seconds"] > 0
        assert abs(row[method]["loss"] - math.log(4096)) < 0.05
    assert abs(row["plain"]["loss"] - row["chunked"]["loss"]) < 1e-4
    assert row["chunked_over_plain"] is not None

    (step,) = data["train_step_memory"]
    fp32, nf4 = step["fp32"], step["nf4-lora"]
    assert "error" not in fp32 and "error" not in nf4, (fp32, nf4)
    assert fp32["trainable_parameters"] == fp32["parameters"] == data["models"]["tiny"]["shape"]["parameters"]
    assert 0 < nf4["trainable_parameters"] < fp32["trainable_parameters"]
    for entry in (fp32, nf4):
        assert entry["total_mib"] == pytest.approx(entry["model_mib"] + entry["peak_increase_mib"], abs=0.2)
    assert "step tiny" in capsys.readouterr().out


def test_bench_memory_rejects_bad_lists(capsys):
    assert main(["bench", "memory", "--parts", "loss,bogus"]) == 2
    assert "--parts" in capsys.readouterr().err
    assert main(["bench", "memory", "--vocabs", "32k"]) == 2
    assert "--vocabs" in capsys.readouterr().err
    assert main(["bench", "memory", "--heads", "thawed"]) == 2
    assert "--heads" in capsys.readouterr().err

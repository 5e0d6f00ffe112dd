"""Benchmarks that back the project's speed and memory claims with measurements (``dist-unlearn bench``).

- :mod:`dist_unlearn.bench.contrastive`: GradCache overhead, peak memory vs global batch, a comparison with
  sentence-transformers' cached ranking loss, and tiled vs full InfoNCE loss memory.
- :mod:`dist_unlearn.bench.memory`: peak-memory probes (RSS high-water mark / CUDA peak) and the runner that
  measures each configuration in a fresh process (:mod:`dist_unlearn.bench.worker`).

Never imports Ray.
"""

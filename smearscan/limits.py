"""The scan's default limits and batch sizes: the library uses them and ``--help`` shows
them, so they live in a module the CLI can import without OpenCV or onnxruntime."""

from __future__ import annotations

#: Default ceiling on decoded pixels (width x height); crops are ~0.2 MP, so 64 MP is generous.
#: OpenCV checks its own limit (OPENCV_IO_MAX_IMAGE_PIXELS, read once when cv2 loads) from
#: the header before allocating; ``smearscan.preprocess`` sets it when imported before cv2.
DEFAULT_MAX_PIXELS = 64_000_000

#: Default cap on a file's size, checked from ``fstat`` before reading: a 450x450 crop is
#: under 1 MB even as BMP, so 128 MiB leaves room for any real crop and none for a 4 GB
#: sparse TIFF or a device that never ends.
DEFAULT_MAX_BYTES = 128 * 1024 * 1024

#: Crops per model call when none is given. On CPU small batches keep the activations in
#: cache: with the four-network default model, batch 8 scanned 2,000 crops 15-20 % faster
#: than 32 with 200 MB peak memory instead of 470 MB (docs/performance.md). CUDA wants
#: larger ones (its batches are padded to one fixed shape): on an H200 with 16 cores, 128
#: scanned 7,155 files/s, 32 5,876 and 256 7,018 (bench/results-gpu.json).
CPU_BATCH_SIZE = 8
CUDA_BATCH_SIZE = 128
#: Ray Data pays a task's overhead per batch; its engine was measured at 32
#: (bench/results-ray.json), so it keeps that default.
RAY_BATCH_SIZE = 32

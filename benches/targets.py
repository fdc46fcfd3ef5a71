#!/usr/bin/env python3
"""The issue-6 targets against a kiln-bench JSON file (`kiln-bench --json PATH`).

    python3 benches/targets.py auto.json [tune.json ...]

Prints one line per target: the best measurement of the cases that count for it (over all the
files given), the target and the reference figures from ../shared/gpu/README.md, and whether it
is met. Rates use the "kernels" column (GPU time from timestamp queries) where a case has it,
else "per run"; the training steps use "per run" (their targets are whole steps, as PyTorch's
figures are). Standard library only: it runs on the GPU machine as it is.
"""

import json
import re
import sys

# (target, case-name pattern, column, goal, unit, reference)
TARGETS = [
    ("f32 matmul 4096^3", r"^matmul 4096\^3$", "kernels", 40_000, "GFLOP/s",
     "cuBLAS SGEMM 50 TFLOP/s, burn-wgpu 20.7"),
    ("f16 matmul on tensor cores", r"^matmul (4096|8192)\^3 \((f16 graph|f16 tensor cores)\)$",
     "kernels", 300_000, "GFLOP/s", "cuBLAS fp16 630 TFLOP/s"),
    ("conv2d f32 64x64x56x56 -> 64, 3x3", r"^conv2d fwd 64x64x56x56 -> 64, 3x3$", "kernels",
     25_000, "GFLOP/s", "cuDNN 34 TFLOP/s"),
    ("fused 5-op elementwise chain", r"^elementwise chain \(5 ops\) 64M values$", "kernels",
     2_500, "GB/s", "relu 2.8 TB/s"),
    ("mnist_cnn training step, batch 64 (<= 1.2 ms)", r"^mnist_cnn train step, batch 64$",
     "per run", 64 / 1.2e-3, "images/s", "PyTorch eager CUDA 1.65 ms"),
    ("LSTM training step, B64 T32 H128 (<= 2.0 ms)",
     r"^lstm train step, batch 64, 32 steps, hidden 128$", "per run", 1 / 2.0e-3, "steps/s",
     "cuDNN 2.4 ms"),
]


def rate(row, column):
    if column == "kernels" and row.get("gpu_kernels") is not None:
        return row["gpu_kernels"], "kernels"
    return row["gpu"], "per run"


def main(paths):
    rows = []
    for path in paths:
        try:
            with open(path) as f:
                doc = json.load(f)
        except (OSError, ValueError) as e:
            print(f"skipping {path}: {e}")
            continue
        for row in doc.get("results", []):
            rows.append((path, row))
    met = 0
    for name, pattern, column, goal, unit, reference in TARGETS:
        found = [(rate(r, column), r["case"], p) for p, r in rows if re.match(pattern, r["case"])]
        if not found:
            print(f"{name:<48} not measured (no case matches {pattern!r})")
            continue
        ((best, col), case, path) = max(found, key=lambda x: x[0][0])
        ok = best >= goal
        met += ok
        step = ""
        if unit in ("images/s", "steps/s"):
            per = (64 if unit == "images/s" else 1) / best * 1e3
            step = f" = {per:.3f} ms/step"
        print(f"{name:<48} {best:>12.1f} {unit} ({col}{step})  target {goal:.0f}  "
              f"{'MET' if ok else 'not met'}  [{case} in {path}; reference: {reference}]")
    print(f"{met} of {len(TARGETS)} targets met")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])

"""Does the error-feedback residual stay bounded? numpy simulation with the reducer's quantizer (per-tensor scale
min(max|x|, c*std(x)), unbiased stochastic rounding; scripts/lowbit_variance.py `quantize`).

Each step a fresh heavy-tailed gradient g (Student t, 4 degrees of freedom, d = 200,000 entries) is added to the
residual r, x = g + r is quantized, and r = x - Q(x) is carried on. Prints |r| / |g| after 1, 10 and 60 steps.

    python scripts/lowbit_ef_growth.py
"""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lowbit_variance import quantize  # noqa: E402


def main() -> int:
    rng = np.random.default_rng(0)
    size = 200_000
    for bits, clip in [(2, 3.0), (2, None), (3, 3.0), (4, 3.0), (8, 3.0)]:
        residual = np.zeros(size)
        ratios = []
        for _ in range(60):
            gradient = rng.standard_t(4, size=size)
            corrected = gradient + residual
            quantized, _, _ = quantize(corrected, bits, clip, rng)
            residual = corrected - quantized
            ratios.append(np.linalg.norm(residual) / np.linalg.norm(gradient))
        print(f"{bits}-bit clip {clip}: |residual|/|g| after 1, 10, 60 steps: "
              f"{ratios[0]:.2f} {ratios[9]:.2f} {ratios[-1]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

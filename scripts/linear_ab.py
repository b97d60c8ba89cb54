"""Projections of a few rows alone, side by side: MKL weight first (what the lean path runs without the kernel and
beyond FEW_ROWS rows) against the server's CPU kernel (prompt_server/model/kernels/linear.cpp), for the default
model's 30 layers of projections (q, k, v, o, gate, up, down; weights as loaded) and its vocabulary projection,
where MKL's rival is oneDNN's prepacked copy the lean path uses. Float32, the server's threads; median of 9.

    .venv/bin/python scripts/linear_ab.py [--rows 1,4,8,16,24,32,48]

The rounds of the two alternate, so that a machine whose speed drifts weighs on each alike. A plain `sum` over the
layers' weights is what reading them once costs on this machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prompt_server.config import default_cache_dir
from prompt_server.model import native
from prompt_server.model.forward import _linear_weight_first, _packed_linear
from prompt_server.model.loader import load_model


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="1,4,8,16,24,32,48")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    kernel = native.load(default_cache_dir()).linear
    model = load_model(None, device="cpu", progress=False, native_kernels=False).model
    linears = [m for layer in model.model.layers for m in (
        layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
        layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)]
    head = model.get_output_embeddings()
    packed = _packed_linear(head)
    weights = sum(m.weight.numel() for m in linears) * 4 / 1e6
    read = median_ms(lambda: [m.weight.sum() for m in linears], args.repeats)
    print(f"{torch.get_num_threads()} threads; reading the layers' {weights:.0f} MB of weights: {read:.1f} ms\n")
    print("| rows | layers, MKL | layers, kernel | ratio | head, oneDNN | head, kernel | ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    with torch.inference_mode():
        for n in (int(r) for r in args.rows.split(",")):
            xs = {k: torch.randn(n, k) for k in {m.in_features for m in linears}}
            h = torch.randn(n, head.in_features)
            runs = {
                "mkl": lambda xs=xs: [_linear_weight_first(m, xs[m.in_features]) for m in linears],
                "kernel": lambda xs=xs: [kernel(xs[m.in_features], m.weight, m.bias) for m in linears],
                "onednn": lambda h=h: packed(h),
                "head": lambda h=h: kernel(h, head.weight, head.bias),
            }
            times: dict[str, list[float]] = {k: [] for k in runs}
            for _ in range(args.repeats):
                for name, fn in runs.items():
                    times[name].append(median_ms(fn, 1))
            t = {k: statistics.median(v) for k, v in times.items()}
            print(f"| {n} | {t['mkl']:.1f} | {t['kernel']:.1f} | {t['mkl'] / t['kernel']:.2f} | {t['onednn']:.1f} | "
                  f"{t['head']:.1f} | {t['onednn'] / t['head']:.2f} |", flush=True)


if __name__ == "__main__":
    main()

"""Peer: PyTorch FlexAttention with the paper's relative logits as a ``score_mod``, on a GPU.

``python benchmarks/peers/flex_attention.py`` (from the repository root, with torch >= 2.5 and a
CUDA GPU; not part of the package, not run by CI). Times forward+backward at the paper's layer
shapes like ``python -m benchmarks.attention --dtype bfloat16 --training_batch`` (same shapes,
batches and dtype; medians after compilation), checks its output against a float32 dense
PyTorch computation of the same logits, and writes ``benchmarks/results/peers-gpu.json`` in the
attention benchmark's row format, which ``python -m benchmarks.plot`` adds to the GPU table.
"""

from __future__ import annotations

import json
import pathlib
import statistics
import time

import torch
from torch.nn.attention.flex_attention import flex_attention

RESULTS = pathlib.Path(__file__).resolve().parent.parent / "results"
# name, batch, H = W, value depth per head (as benchmarks.attention.PAPER_SHAPES, training batches)
SHAPES = (
    ("wrn_32x32", 128, 32, 2),
    ("wrn_16x16", 128, 16, 4),
    ("wrn_8x8", 128, 8, 8),
    ("r50_56x56", 32, 56, 1),
    ("r50_28x28", 32, 28, 2),
    ("r50_14x14", 32, 14, 3),
    ("r50_7x7", 32, 7, 6),
)
HEADS, KEY_DEPTH = 8, 20


def relative_attention(q, k, v, rel_h, rel_w, size):
    """q, k ``[B, N, T, d]``, v ``[B, N, T, d]`` (padded to d); relative factors as a score_mod."""
    scale = KEY_DEPTH**-0.5
    rows = torch.arange(size, device=q.device)
    table_h = rel_h[rows[None, :] - rows[:, None] + size - 1]  # [H, H, d]: query row, key row
    table_w = rel_w[rows[None, :] - rows[:, None] + size - 1]
    qs = q * scale
    grid = qs.unflatten(2, (size, size))  # B, N, H, W, d
    logits_h = torch.einsum("bnxyd,xzd->bnxyz", grid, table_h).flatten(2, 3).float()  # B, N, T, H
    logits_w = torch.einsum("bnxyd,ywd->bnxyw", grid, table_w).flatten(2, 3).float()  # B, N, T, W

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + logits_h[b, h, q_idx, kv_idx // size] + logits_w[b, h, q_idx, kv_idx % size]

    return flex_attention(qs, k, v, score_mod=score_mod, scale=1.0)


def dense_reference(q, k, v, rel_h, rel_w, size):
    qs = (q * KEY_DEPTH**-0.5).float()
    rows = torch.arange(size, device=q.device)
    table_h = rel_h.float()[rows[None, :] - rows[:, None] + size - 1]
    table_w = rel_w.float()[rows[None, :] - rows[:, None] + size - 1]
    grid = qs.unflatten(2, (size, size))
    logits = torch.einsum("bnqd,bntd->bnqt", qs, k.float()).unflatten(3, (size, size))  # B, N, T, H, W
    logits = logits + torch.einsum("bnxyd,xzd->bnxyz", grid, table_h).flatten(2, 3)[..., :, None]
    logits = logits + torch.einsum("bnxyd,ywd->bnxyw", grid, table_w).flatten(2, 3)[..., None, :]
    return torch.softmax(logits.flatten(3), dim=-1) @ v.float()


def median_seconds(fn, repeats=10):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(compiled, name: str, batch: int, size: int, value_depth: int) -> dict:
    """One attention benchmark row: forward+backward median seconds, peak memory, error."""
    tokens = size * size
    generator = torch.Generator(device="cuda").manual_seed(0)

    def normal(*shape):
        return torch.randn(*shape, device="cuda", generator=generator, dtype=torch.bfloat16)

    q, k = (normal(batch, HEADS, tokens, KEY_DEPTH).requires_grad_() for _ in range(2))
    # FlexAttention takes values as deep as the keys: zero-padded, as the JAX fused path does
    v = torch.nn.functional.pad(normal(batch, HEADS, tokens, value_depth), (0, KEY_DEPTH - value_depth))
    v.requires_grad_()
    scale = KEY_DEPTH**-0.5
    rel_h, rel_w = ((normal(2 * size - 1, KEY_DEPTH) * scale).requires_grad_() for _ in range(2))
    cotangent = torch.randn_like(v)
    out = compiled(q, k, v, rel_h, rel_w, size)
    error = (out.float() - dense_reference(q, k, v, rel_h, rel_w, size)).abs().max().item()

    def step():
        out = compiled(q, k, v, rel_h, rel_w, size)
        torch.autograd.grad(out, (q, k, v, rel_h, rel_w), cotangent)

    torch.cuda.reset_peak_memory_stats()
    seconds = median_seconds(step)
    shape = dict(name=name, batch=batch, height=size, width=size, heads=HEADS, key_depth=KEY_DEPTH)
    return {
        "shape": shape | {"value_depth": value_depth},
        "implementation": "flex_attention",
        "dtype": "bfloat16",
        "seconds": seconds,
        "temp_bytes": torch.cuda.max_memory_allocated(),
        "max_abs_error_vs_float32_dense": error,
    }


def main() -> None:
    compiled = torch.compile(relative_attention, dynamic=False)
    rows = []
    for shape in SHAPES:
        row = measure(compiled, *shape)
        error = row["max_abs_error_vs_float32_dense"]
        print(f"{shape[0]:<12}{1e3 * row['seconds']:9.2f} ms  max |error| {error:.3g}", flush=True)
        rows.append(row)
    machine = {"torch": torch.__version__, "device_kind": torch.cuda.get_device_name(), "platform": "gpu"}
    path = RESULTS / "peers-gpu.json"
    path.write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

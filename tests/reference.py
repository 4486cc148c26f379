"""Brute-force NumPy references for ``aacn_jax.functional``.

Written directly from the equations of the contract with explicit Python
loops (no einsum, no pad-and-reshape trick) so that they are an independent
check of the vectorised JAX implementation.  All computation is in float64.

Layout: NHWC with heads after space, i.e. ``q[b, x, y, n, :]``.
"""

from __future__ import annotations

import numpy as np


def _f64(a):
    return np.asarray(a, dtype=np.float64)


def rel_to_abs_ref(x):
    """``[..., L, 2L-1] -> [..., L, L]`` with ``out[..., i, j] = x[..., i, j - i + L - 1]``."""
    x = _f64(x)
    L = x.shape[-2]
    assert x.shape[-1] == 2 * L - 1, x.shape
    out = np.zeros((*x.shape[:-1], L), dtype=np.float64)
    for i in range(L):
        for j in range(L):
            out[..., i, j] = x[..., i, j - i + L - 1]
    return out


def relative_logits_ref(q, rel_h, rel_w):
    """``q [B,H,W,N,d]``, ``rel_h [2H-1,d]``, ``rel_w [2W-1,d]`` -> ``[B,N,H,W,H,W]``.

    ``out[b,n,x,y,x2,y2] = q[b,x,y,n]·rel_h[x2-x+H-1] + q[b,x,y,n]·rel_w[y2-y+W-1]``
    (no scaling).
    """
    q, rel_h, rel_w = _f64(q), _f64(rel_h), _f64(rel_w)
    B, H, W, N, d = q.shape
    assert rel_h.shape == (2 * H - 1, d), rel_h.shape
    assert rel_w.shape == (2 * W - 1, d), rel_w.shape
    out = np.zeros((B, N, H, W, H, W), dtype=np.float64)
    for b in range(B):
        for n in range(N):
            for x in range(H):
                for y in range(W):
                    qv = q[b, x, y, n]
                    for x2 in range(H):
                        hterm = np.dot(qv, rel_h[x2 - x + H - 1])
                        for y2 in range(W):
                            wterm = np.dot(qv, rel_w[y2 - y + W - 1])
                            out[b, n, x, y, x2, y2] = hterm + wterm
    return out


def self_attention_2d_ref(q, k, v, rel_h=None, rel_w=None):
    """2-D multi-head self-attention with optional relative position logits.

    ``q, k [B,H,W,N,dk]``, ``v [B,H,W,N,dv]`` -> ``[B,H,W,N,dv]`` (float64).
    For each (b, n, x, y): logits over all keys (x2, y2) are
    ``qs·k[b,x2,y2,n] + relative_logits(qs)[b,n,x,y,x2,y2]`` with
    ``qs = q * dk**-0.5``; softmax over the H*W keys; weighted sum of ``v``.
    """
    v = _f64(v)
    B, H, W, N, _ = np.shape(q)
    assert v.shape[:-1] == np.shape(q)[:-1], (v.shape, np.shape(q))
    weights = attention_weights_ref(q, k, rel_h, rel_w)
    out = np.zeros((B, H, W, N, v.shape[-1]), dtype=np.float64)
    for b in range(B):
        for n in range(N):
            for x in range(H):
                for y in range(W):
                    for x2 in range(H):
                        for y2 in range(W):
                            out[b, x, y, n] += weights[b, n, x, y, x2, y2] * v[b, x2, y2, n]
    return out


def attention_weights_ref(q, k, rel_h=None, rel_w=None):
    """Softmax attention probabilities ``[B,N,H,W,H,W]`` (float64), which :func:`self_attention_2d_ref`
    applies to v.

    ``out[b,n,x,y,x2,y2] = exp(l[x2,y2]) / sum_{x3,y3} exp(l[x3,y3])`` where, with
    ``qs = q * dk**-0.5``, ``l[x2,y2] = qs[b,x,y,n]·k[b,x2,y2,n]`` plus, with tables,
    ``qs[b,x,y,n]·rel_h[x2-x+H-1] + qs[b,x,y,n]·rel_w[y2-y+W-1]``.
    """
    q, k = _f64(q), _f64(k)
    B, H, W, N, dk = q.shape
    assert k.shape == q.shape, (k.shape, q.shape)
    if (rel_h is None) != (rel_w is None):
        raise ValueError("rel_h and rel_w must both be given or both be None")
    qs = q * dk**-0.5
    out = np.zeros((B, N, H, W, H, W), dtype=np.float64)
    for b in range(B):
        for n in range(N):
            for x in range(H):
                for y in range(W):
                    qv = qs[b, x, y, n]
                    logits = np.zeros((H, W), dtype=np.float64)
                    for x2 in range(H):
                        for y2 in range(W):
                            logits[x2, y2] = np.dot(qv, k[b, x2, y2, n])
                            if rel_h is not None:
                                logits[x2, y2] += np.dot(qv, _f64(rel_h)[x2 - x + H - 1])
                                logits[x2, y2] += np.dot(qv, _f64(rel_w)[y2 - y + W - 1])
                    e = np.exp(logits - logits.max())
                    out[b, n, x, y] = e / e.sum()
    return out


def conv1x1_ref(x, params):
    return np.asarray(x, np.float64) @ np.asarray(params["kernel"][0, 0], np.float64) + params["bias"]


def layer_self_attention_ref(x, params, dk, dv, heads, relative=True):
    """SelfAttention2D from the paper: 1x1 qkv, split heads, attend per head, concat, 1x1 W^O."""
    qkv = conv1x1_ref(x, params["qkv"])
    q, k, v = qkv[..., :dk], qkv[..., dk : 2 * dk], qkv[..., 2 * dk :]
    heads_out = []
    for n in range(heads):  # one head at a time, all sharing the same tables
        sl_k = slice(n * dk // heads, (n + 1) * dk // heads)
        sl_v = slice(n * dv // heads, (n + 1) * dv // heads)
        tables = (params["rel_h"], params["rel_w"]) if relative else (None, None)
        out = self_attention_2d_ref(
            q[..., None, sl_k],
            k[..., None, sl_k],
            v[..., None, sl_v],
            *[None if t is None else np.asarray(t, np.float64) for t in tables],
        )
        heads_out.append(out[..., 0, :])
    return conv1x1_ref(np.concatenate(heads_out, axis=-1), params["out"])


def mean_pool_ref(x, window):
    """Stride = window, SAME padding split as XLA does (half before, the rest after), means of the
    pixels inside the map only; one output cell at a time."""
    x = _f64(x)
    B, H, W, C = x.shape
    out_h, out_w = -(-H // window[0]), -(-W // window[1])
    top = (out_h * window[0] - H) // 2
    left = (out_w * window[1] - W) // 2
    out = np.zeros((B, out_h, out_w, C))
    for i in range(out_h):
        for j in range(out_w):
            rows = [r for r in range(i * window[0] - top, (i + 1) * window[0] - top) if 0 <= r < H]
            cols = [c for c in range(j * window[1] - left, (j + 1) * window[1] - left) if 0 <= c < W]
            out[:, i, j] = x[:, rows][:, :, cols].mean(axis=(1, 2))
    return out, (top, left)


def attention_loss_gradients_ref(args, cotangent, eps=1e-6):
    """Central differences (step ``eps``, float64) of ``sum(self_attention_2d_ref(*args) * cotangent)``
    with respect to each of ``args``: the gradients an implementation's backward pass must give."""
    loss = lambda *a: float(np.sum(self_attention_2d_ref(*a) * cotangent))
    gradients = []
    for index, arg in enumerate(args):
        expected = np.zeros_like(arg, dtype=np.float64)
        for position in np.ndindex(arg.shape):
            shifted = [list(args), list(args)]
            for sign, variant in zip((1, -1), shifted, strict=True):
                variant[index] = np.array(arg, np.float64)
                variant[index][position] += sign * eps
            expected[position] = (loss(*shifted[0]) - loss(*shifted[1])) / (2 * eps)
        gradients.append(expected)
    return gradients

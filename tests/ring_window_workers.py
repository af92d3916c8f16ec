"""Worker side of tests/test_ring_window.py: one gloo group per world size runs every window/softcap/ALiBi case.

Each rank builds the same global inputs, computes single-device ``flash_attn_func`` / ``flash_attn_varlen_func``
on the whole sequence (the reference), runs the ring on its shard (``ring_attn.shard`` / ``shard_varlen``,
padding included), gathers the ring's out, LSE and gradients (``unshard``) and records the largest errors
against the reference; the parent asserts. Workers use the fp32 torch reference backend, except the cases
marked ``triton`` (the Triton kernels through the interpreter).
"""
from __future__ import annotations

import os
import time
import traceback

import torch

LAYOUTS = ("contiguous", "zigzag", "striped")
# (causal, window_size, softcap)
MASKS = [(True, (5, -1), 0.0), (False, (3, 4), 0.0), (True, (-1, -1), 2.0), (False, (7, 0), 1.5),
         (True, (0, 0), 0.0)]


def cases_for(world: int) -> list[dict]:
    cases = []
    for layout in LAYOUTS:
        for causal, window, softcap in MASKS:
            cases.append(dict(kind="dense", layout=layout, causal=causal, window=window, softcap=softcap,
                              S=6 * 2 * world))
        # padded shards (a length the layout cannot split): windows over the real tokens only
        cases.append(dict(kind="dense", layout=layout, causal=True, window=(4, -1), softcap=0.0, S=6 * 2 * world - 3))
        cases.append(dict(kind="dense", layout=layout, causal=False, window=(2, 3), softcap=1.0, S=6 * 2 * world - 1))
        # packed sequences: one length, different lengths (shards of different sizes: one plan per size)
        cases.append(dict(kind="varlen", layout=layout, causal=True, window=(3, -1), softcap=0.0,
                          lens=[4 * world, 4 * world]))
        cases.append(dict(kind="varlen", layout=layout, causal=True, window=(-1, -1), softcap=2.5,
                          lens=[2 * world, 6 * world - 1, 1]))
        cases.append(dict(kind="varlen", layout=layout, causal=True, window=(4, -1), softcap=1.0,
                          lens=[2 * world, 6 * world - 1, 0, 1, 8 * world]))
        cases.append(dict(kind="varlen", layout=layout, causal=False, window=(2, 5), softcap=0.0,
                          lens=[5 * world + 1, 2 * world]))
    # ALiBi: slopes [h_q] ("heads"), [b, h_q] / [n_seqs, h_q] ("rows")
    for layout in ("contiguous", "zigzag", "striped"):
        cases.append(dict(kind="dense", layout=layout, causal=True, window=(-1, -1), softcap=0.0, S=6 * 2 * world,
                          alibi="heads"))
        cases.append(dict(kind="dense", layout=layout, causal=False, window=(-1, -1), softcap=0.0, S=6 * 2 * world,
                          alibi="rows"))
        cases.append(dict(kind="dense", layout=layout, causal=True, window=(5, -1), softcap=2.0,
                          S=6 * 2 * world - 3, alibi="rows"))
        cases.append(dict(kind="dense", layout=layout, causal=False, window=(3, 4), softcap=0.0,
                          S=6 * 2 * world - 1, alibi="heads"))
        cases.append(dict(kind="varlen", layout=layout, causal=True, window=(-1, -1), softcap=0.0,
                          lens=[2 * world, 6 * world - 1, 0, 1, 8 * world], alibi="rows"))
        cases.append(dict(kind="varlen", layout=layout, causal=False, window=(2, 5), softcap=1.5,
                          lens=[5 * world + 1, 2 * world], alibi="heads"))
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") and world == 2:
        for layout in LAYOUTS:
            cases.append(dict(kind="dense", layout=layout, causal=True, window=(6, -1), softcap=2.0, S=36,
                              triton=True))
        cases.append(dict(kind="dense", layout="zigzag", causal=True, window=(-1, -1), softcap=0.0, S=36,
                          alibi="rows", triton=True))
        cases.append(dict(kind="dense", layout="striped", causal=False, window=(5, 3), softcap=0.0, S=36,
                          alibi="heads", triton=True))
    for i, c in enumerate(cases):
        c["name"] = (f"w{world}-{i:02d}-{c['kind']}-{c['layout']}-{'causal' if c['causal'] else 'full'}-"
                     f"win{c['window'][0]}_{c['window'][1]}-cap{c['softcap']}" + ("-triton" if c.get("triton") else "")
                     + (f"-S{c['S']}" if "S" in c else f"-lens{'_'.join(map(str, c['lens']))}")
                     + (f"-alibi_{c['alibi']}" if c.get("alibi") else ""))
    return cases


def _errors(got: dict, ref: dict) -> dict:
    out = {}
    for key, r in ref.items():
        g = got[key].double()
        r = r.double()
        fin = torch.isfinite(r)
        same_inf = bool(torch.equal(torch.isinf(g), torch.isinf(r)))
        out[key] = ((g[fin] - r[fin]).abs().max().item() / max(1.0, r[fin].abs().max().item())
                    if fin.any() else 0.0, same_inf)
    return out


def _slopes(case, n_rows, h_q, g):
    """ALiBi slopes for a case: None, [h_q] ("heads") or [n_rows, h_q] ("rows"); large enough to matter."""
    if not case.get("alibi"):
        return None
    shape = (h_q,) if case["alibi"] == "heads" else (n_rows, h_q)
    return torch.rand(shape, generator=g) * 0.5 + 0.05


def _dense_case(case, world, group):
    import ring_attn

    g = torch.Generator().manual_seed(case["S"])
    b, S, h_q, h_kv, d = 2, case["S"], 4, 2, 16
    q, k, v, dout = (torch.randn(shape, generator=g) for shape in ((b, S, h_q, d), (b, S, h_kv, d), (b, S, h_kv, d),
                                                                   (b, S, h_q, d)))
    opts = dict(causal=case["causal"], window_size=case["window"], softcap=case["softcap"],
                alibi_slopes=_slopes(case, b, h_q, g))
    qf, kf, vf = (x.clone().requires_grad_() for x in (q, k, v))
    out, lse = ring_attn.flash_attn_func(qf, kf, vf, **opts, return_lse=True)
    out.backward(dout)
    ref = dict(out=out.detach(), lse=lse.detach(), dq=qf.grad, dk=kf.grad, dv=vf.grad)

    lay = case["layout"]
    ql, kl, vl, dl = (ring_attn.shard(x, 1, group, lay).requires_grad_(x is not dout) for x in (q, k, v, dout))
    ql, kl, vl = (x.detach().requires_grad_() for x in (ql, kl, vl))
    o, l = ring_attn.ring_attn_func(ql, kl, vl, **opts, group=group, layout=lay, seqlen=S, return_lse=True)
    o.backward(dl.detach())
    got = dict(out=ring_attn.unshard(o.detach(), 1, group, lay, seqlen=S),
               lse=ring_attn.unshard(l.detach(), 2, group, lay, seqlen=S),
               dq=ring_attn.unshard(ql.grad, 1, group, lay, seqlen=S),
               dk=ring_attn.unshard(kl.grad, 1, group, lay, seqlen=S),
               dv=ring_attn.unshard(vl.grad, 1, group, lay, seqlen=S))
    return _errors(got, ref)


def _varlen_case(case, world, group):
    import ring_attn
    from ring_attn.ring.layout import shard_varlen, unshard_varlen

    lens = case["lens"]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    t = int(cu[-1])
    g = torch.Generator().manual_seed(t)
    q, k, v, dout = (torch.randn(shape, generator=g) for shape in ((t, 4, 16), (t, 2, 16), (t, 2, 16), (t, 4, 16)))
    opts = dict(causal=case["causal"], window_size=case["window"], softcap=case["softcap"],
                alibi_slopes=_slopes(case, len(lens), 4, g))
    qf, kf, vf = (x.clone().requires_grad_() for x in (q, k, v))
    out, lse = ring_attn.flash_attn_varlen_func(qf, kf, vf, cu, cu, max(lens), max(lens), **opts, return_lse=True)
    out.backward(dout)
    ref = dict(out=out.detach(), lse=lse.detach().t(), dq=qf.grad, dk=kf.grad, dv=vf.grad)
    lay = case["layout"]
    ql, kl, vl, dl = (shard_varlen(x, cu, 0, group, lay) for x in (q, k, v, dout))
    ql, kl, vl = (x.requires_grad_() for x in (ql, kl, vl))
    o, l = ring_attn.ring_attn_varlen_func(ql, kl, vl, cu, max(lens), **opts, group=group, layout=lay,
                                           return_lse=True)
    o.backward(dl)
    got = dict(out=unshard_varlen(o.detach(), cu, 0, group, lay), lse=unshard_varlen(l.detach().t(), cu, 0, group, lay),
               dq=unshard_varlen(ql.grad, cu, 0, group, lay), dk=unshard_varlen(kl.grad, cu, 0, group, lay),
               dv=unshard_varlen(vl.grad, cu, 0, group, lay))
    return _errors(got, ref)


def _worker(rank, world, init_file, outdir):
    from spawn_world import worker_group

    from ring_attn import backends

    with worker_group(rank, world, init_file, outdir) as results:
        for case in cases_for(world):
            t0 = time.monotonic()
            try:
                with backends.force("triton" if case.get("triton") else "reference"):
                    res = (_dense_case if case["kind"] == "dense" else _varlen_case)(case, world, None)
                results[case["name"]] = dict(errors=res, seconds=time.monotonic() - t0)
            except Exception:
                results[case["name"]] = dict(error=traceback.format_exc())


def run_world(world: int, outdir: str, timeout_s: float = 400.0) -> list[dict]:
    """Spawn ``world`` gloo ranks once, run every case, return each rank's results (index = rank)."""
    from spawn_world import run_world as spawn

    return spawn(_worker, world, outdir, timeout_s)

"""``vidssl bench models``: forward and forward+backward time per clip on CPU for each backbone.

Each backbone runs ``--repeats`` timed iterations (after ``--warmup``; backbones interleaved in
each repeat) on a random batch of ``--batch`` clips of ``--frames`` x ``--size`` x ``--size``
(train mode; "forward" without autograd, "fwd+bwd" a forward with autograd plus backward of the
mean feature). The report gives medians per clip (and the fastest fwd+bwd), the ratio of the
median fwd+bwd time against the baseline backbone (``--baseline``, timed in the same run), and the
activation memory autograd keeps for the backward pass per clip (bytes of the saved tensors, counted
with ``torch.autograd.graph.saved_tensors_hooks``: what training holds on any device, independent of
the allocator). ``--activation-checkpointing`` adds a ``NAME+ckpt`` row for each backbone that
supports it (``model.activation_checkpointing``), timed in the same round-robin.
"""

from __future__ import annotations

import json
import statistics
import time

from vidssl.errors import UserError


def register(sub) -> None:
    from vidssl.cli import add_command

    p = add_command(sub, "models", help="forward/backward time per clip on CPU for each backbone")
    p.add_argument("--backbones", default="all", help="comma-separated names, or 'all' (default)")
    p.add_argument("--baseline", default="cnn3d_small", help="backbone the ratios refer to (default cnn3d_small)")
    p.add_argument("--batch", type=int, default=4, help="clips per batch (default 4)")
    p.add_argument("--frames", type=int, default=8, help="frames per clip (default 8, the demo size)")
    p.add_argument("--size", type=int, default=64, help="frame height and width (default 64, the demo size)")
    p.add_argument("--repeats", type=int, default=5, help="timed iterations per backbone (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations first (default 1)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="also time each backbone that supports it with model.activation_checkpointing on")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.set_defaults(func=run)


def saved_bytes(fn, module=None) -> int:
    """Bytes of the activations autograd keeps for the backward pass while ``fn()`` runs: storage
    shared between saved tensors is counted once, ``module``'s parameters (held anyway) not at all."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in module.parameters()} if module is not None else set()
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def run(args) -> int:
    import torch

    from vidssl.models import available_backbones, build_backbone

    for name in ("batch", "frames", "size", "repeats"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name}: got {getattr(args, name)}; expected an integer >= 1")
    if args.warmup < 0 or args.threads < 0:
        raise UserError(f"--warmup/--threads: got {args.warmup}/{args.threads}; expected integers >= 0")
    names = available_backbones() if args.backbones == "all" else [n.strip() for n in args.backbones.split(",")]
    unknown = [n for n in [*names, args.baseline] if n not in available_backbones()]
    if unknown:
        raise UserError(f"--backbones/--baseline: unknown backbone {unknown[0]!r}; allowed: "
                        f"{', '.join(available_backbones())}")
    if any(n.startswith("vit") for n in [*names, args.baseline]) and (args.frames % 2 or args.size % 16):
        raise UserError(f"--frames {args.frames} / --size {args.size}: ViT backbones need an even number of "
                        f"frames and a size that is a multiple of 16")
    names = [args.baseline, *[n for n in names if n != args.baseline]]
    if args.threads:
        torch.set_num_threads(args.threads)

    x = torch.randn(args.batch, 3, args.frames, args.size, args.size)  # (B, C, T, H, W)
    nets = {}
    for name in names:
        torch.manual_seed(0)
        nets[name] = build_backbone(name).train()
        if args.activation_checkpointing and nets[name].supports_activation_checkpointing:
            torch.manual_seed(0)
            nets[f"{name}+ckpt"] = build_backbone(name).train()
            nets[f"{name}+ckpt"].set_activation_checkpointing(True)
    kept = {name: saved_bytes(lambda net=net: net.forward_features(x), net) / args.batch for name, net in nets.items()}
    names = list(nets)
    fwd: dict[str, list[float]] = {n: [] for n in names}
    fb: dict[str, list[float]] = {n: [] for n in names}
    # Round-robin over the backbones inside each repeat, so load from other processes on a shared
    # machine hits every backbone (and the baseline) alike and the ratios stay meaningful.
    for i in range(args.warmup + args.repeats):
        for name, net in nets.items():
            t0 = time.perf_counter()
            with torch.no_grad():
                net.forward_features(x)
            t1 = time.perf_counter()
            net.zero_grad(set_to_none=True)
            net.forward_features(x).mean().backward()
            t2 = time.perf_counter()
            if i >= args.warmup:
                fwd[name].append((t1 - t0) / args.batch)
                fb[name].append((t2 - t1) / args.batch)
    rows = []
    for name, net in nets.items():
        rows.append({"backbone": name, "params_m": sum(p.numel() for p in net.parameters()) / 1e6,
                     "embed_dim": net.embed_dim, "steps": net.out_steps(args.frames),
                     "forward_ms_per_clip": 1e3 * statistics.median(fwd[name]),
                     "fwd_bwd_ms_per_clip": 1e3 * statistics.median(fb[name]),
                     "fwd_bwd_ms_min": 1e3 * min(fb[name]), "kept_mb_per_clip": kept[name] / 2**20})
    base = next(r for r in rows if r["backbone"] == args.baseline)
    for r in rows:
        r["fwd_bwd_ratio_vs_baseline"] = r["fwd_bwd_ms_per_clip"] / base["fwd_bwd_ms_per_clip"]
    print(f"clips {args.batch} x {args.frames} x {args.size}x{args.size}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}; ratio: fwd+bwd time / {args.baseline}'s")
    print(f"{'backbone':<16} {'params':>8} {'D':>5} {'T_':>3} {'fwd ms/clip':>12} {'fwd+bwd ms/clip':>16} "
          f"{'(min)':>7} {'ratio':>7} {'kept MB/clip':>13}")
    for r in rows:
        print(f"{r['backbone']:<16} {r['params_m']:>7.1f}M {r['embed_dim']:>5} {r['steps']:>3} "
              f"{r['forward_ms_per_clip']:>12.1f} {r['fwd_bwd_ms_per_clip']:>16.1f} {r['fwd_bwd_ms_min']:>7.1f} "
              f"{r['fwd_bwd_ratio_vs_baseline']:>7.2f} {r['kept_mb_per_clip']:>13.1f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"batch": args.batch, "frames": args.frames, "size": args.size, "repeats": args.repeats,
                       "threads": torch.get_num_threads(), "results": rows}, f, indent=2)
    return 0

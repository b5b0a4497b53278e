"""``vidssl data``: inspect a dataset through the loader.

    vidssl data peek [-n N] [--save FILE.png] [--save-dir DIR] DATASET [config.yaml] [key=value ...]
        read N batches: shapes/keys/labels/time; --save/--save-dir draw contact sheets (vidssl.data.sheet)
    vidssl data plan [--world-size W] DATASET [config.yaml] [key=value ...]   batches per rank, coverage, padding

Options go before DATASET (everything after it is config). Overrides are DataConfig fields (``frames=16 mode=clip workers=0``), see docs/data.md.
"""

from __future__ import annotations

import argparse
import os

__all__ = ["register", "run_peek", "run_plan"]


def register(sub) -> None:
    from vidssl.cli import Parser, add_command  # noqa: PLC0415

    p = add_command(sub, "data", help="inspect a dataset through the streaming loader (peek, plan)")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", parser_class=Parser)
    dsub.required = True
    peek = add_command(dsub, "peek", help="read a few batches and print their shapes, keys, labels and timing")
    peek.add_argument("dataset", help="dataset folder or URL (holding index.json)")
    peek.add_argument("config", nargs="*", help="a data config *.yaml and/or DataConfig overrides KEY=VALUE")
    peek.add_argument("-n", "--batches", type=int, default=3, help="batches to read (default 3)")
    peek.add_argument("--rank", type=int, default=0)
    peek.add_argument("--world-size", type=int, default=1)
    peek.add_argument("--save", metavar="FILE.png", help="write a contact sheet of all batches read (one row per "
                      "sample, every window, frame numbers, key/label; padding rows marked)")
    peek.add_argument("--save-dir", metavar="DIR", help="write one contact sheet per batch: DIR/batch-001.png, ...")
    peek.add_argument("--scale", type=int, default=0, help="enlarge frames by this integer factor in the sheets "
                      "(nearest neighbour; default: enough to make frames at least 64 px tall, at most 4)")
    peek.set_defaults(func=run_peek)
    plan = add_command(dsub, "plan", help="print the epoch plan: batches per rank, coverage, padding")
    plan.add_argument("dataset", help="dataset folder or URL (holding index.json)")
    plan.add_argument("config", nargs="*", help="a data config *.yaml and/or DataConfig overrides KEY=VALUE")
    plan.add_argument("--world-size", type=int, default=1)
    plan.add_argument("--epoch", type=int, default=0)
    plan.set_defaults(func=run_plan)


def _config(args: argparse.Namespace):
    from vidssl.config import parse_config_args  # noqa: PLC0415
    from vidssl.data.config import DataConfig  # noqa: PLC0415
    from vidssl.errors import UserError  # noqa: PLC0415

    if getattr(args, "world_size", 1) < 1:
        raise UserError(f"--world-size: got {args.world_size}; allowed: >= 1")
    items, base = list(args.config), None
    yamls = [i for i in items if "=" not in i and i.endswith((".yaml", ".yml"))]
    if len(yamls) == 1:
        # Read once here and passed as the base. A whole-run config (demo, training: sections
        # footage/shard/data/model/...) works too: its `data:` section is the data config.
        from vidssl.config import load_yaml  # noqa: PLC0415

        base = load_yaml(yamls[0])
        if isinstance(base, dict) and "data" in base:  # DataConfig has no field named `data`
            if not isinstance(base["data"], dict):
                raise UserError(f"{yamls[0]}: data: got {base['data']!r}; expected a mapping of DataConfig fields")
            base = base["data"]
        items.remove(yamls[0])
    return parse_config_args(DataConfig, [*items, f"dataset={args.dataset}"], base=base)


def _shape(v) -> str:
    if hasattr(v, "shape"):
        return f"{tuple(v.shape)} {str(v.dtype).replace('torch.', '')}"
    if isinstance(v, list):
        return f"list[{len(v)}]"
    return type(v).__name__


def _check_save(args: argparse.Namespace) -> None:
    """Refuse unusable --save/--save-dir/--scale before reading anything; create the --save-dir folder."""
    from vidssl.errors import UserError  # noqa: PLC0415

    if args.scale < 0 or args.scale > 16:
        raise UserError(f"--scale: got {args.scale}; allowed: 1..16 (0: automatic)")
    if args.save:
        if not args.save.lower().endswith(".png"):
            raise UserError(f"--save: got {args.save!r}; expected a file name ending in .png")
        parent = os.path.dirname(os.path.abspath(args.save))
        if not os.path.isdir(parent):
            raise UserError(f"--save {args.save!r}: the folder {parent!r} does not exist")
        if os.path.isdir(args.save):
            raise UserError(f"--save {args.save!r} is a folder; give a file name ending in .png (or use --save-dir)")
    if args.save_dir:
        if os.path.exists(args.save_dir) and not os.path.isdir(args.save_dir):
            raise UserError(f"--save-dir {args.save_dir!r} exists and is not a folder")
        try:
            os.makedirs(args.save_dir, exist_ok=True)
        except OSError as exc:
            raise UserError(f"--save-dir {args.save_dir!r}: cannot create it ({exc})") from None


def run_peek(args: argparse.Namespace) -> int:
    import time  # noqa: PLC0415

    from vidssl.data.loader import build_loader  # noqa: PLC0415
    from vidssl.errors import UserError  # noqa: PLC0415

    if args.batches < 1:
        raise UserError(f"--batches: got {args.batches}; allowed: >= 1")
    _check_save(args)
    cfg = _config(args)
    t0 = time.perf_counter()
    loader = build_loader(cfg, rank=args.rank, world_size=args.world_size)
    print(f"dataset {', '.join(cfg.dataset)}: mode={cfg.mode} backend={cfg.backend} workers={cfg.workers} "
          f"batches/epoch={len(loader)} (rank {args.rank} of {args.world_size})")
    t_first = None
    n = 0
    clips = 0
    sheet_rows: list = []
    for batch in loader:
        now = time.perf_counter()
        t_first = t_first or now - t0
        n += 1
        clips += len(batch["key"])
        shapes = ", ".join(f"{k} {_shape(v)}" for k, v in batch.items() if k not in ("key", "frame_indices"))
        fi = ", ".join(f"{k} {tuple(v.shape)}" for k, v in batch["frame_indices"].items())
        labels = batch["label"].tolist()
        names = [loader.classes[i] if 0 <= i < len(loader.classes) else "-" for i in labels]
        print(f"batch {n}: {shapes}; frame_indices {fi}")
        print(f"  keys {batch['key'][:4]}{' ...' if len(batch['key']) > 4 else ''}  labels {labels[:8]} {names[:8]}  "
              f"valid {int(batch['valid'].sum())}/{len(labels)}")
        if args.save or args.save_dir:
            from vidssl.data import sheet  # noqa: PLC0415

            rows = sheet.rows_from_batch(batch, loader.classes, batch_number=n)  # copies: buffers get reused
            if args.save_dir:
                path = os.path.join(args.save_dir, f"batch-{n:03d}.png")
                sheet.save_png(sheet.draw_sheet(rows, args.scale or sheet.auto_scale(rows)), path)
                print(f"  wrote {path}")
            if args.save:
                sheet_rows.extend(rows)
        if n >= args.batches:
            break
    total = time.perf_counter() - t0
    if args.save and sheet_rows:
        from vidssl.data import sheet  # noqa: PLC0415

        sheet.save_png(sheet.draw_sheet(sheet_rows, args.scale or sheet.auto_scale(sheet_rows)), args.save)
        print(f"wrote {args.save} ({len(sheet_rows)} rows)")
    print(f"read {n} batches ({clips} clips) in {total:.2f}s (first batch after {t_first or 0:.2f}s)")
    errs = dict(loader.stats["errors"])
    if errs:
        print(f"skipped samples: {errs}")
    return 0


def run_plan(args: argparse.Namespace) -> int:
    from vidssl.data.index import open_index  # noqa: PLC0415
    from vidssl.data.plan import PlanSpec, shard_refs  # noqa: PLC0415
    from vidssl.errors import UserError  # noqa: PLC0415

    cfg = _config(args)
    if args.epoch < 0:
        raise UserError(f"--epoch: got {args.epoch}; allowed: >= 0")
    shards = shard_refs([open_index(loc, cfg.read_timeout) for loc in cfg.dataset])
    try:
        plan = PlanSpec.from_config(cfg, args.world_size).plan(shards, args.epoch, ranks=[0])
    except ValueError as exc:
        raise UserError(f"data plan: {exc}") from None
    s = plan.summary()
    print(f"dataset {', '.join(cfg.dataset)}: {len(shards)} shards, {s['samples_total']} samples")
    print(f"epoch {args.epoch}: world_size={args.world_size} workers={plan.workers} batch_size={cfg.batch_size} "
          f"{'resampled' if cfg.resampled else 'drop_last=' + str(cfg.drop_last).lower()}")
    print(f"batches per rank: {plan.batches_per_rank} (every rank)")
    per_worker = [plan.worker(0, k).batches for k in range(plan.workers)]
    print(f"batches per worker on rank 0: {per_worker}")
    print(f"samples selected {s['samples_selected']}, covered {s['samples_covered']} "
          f"(coverage {100 * plan.coverage:.1f}%), padding {s['samples_padding']}, dropped {s['samples_dropped']}")
    return 0

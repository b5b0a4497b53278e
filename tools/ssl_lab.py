"""The SSL investigation's harness (docs/ssl.md): pretrain with vidssl's SSLModel, then linear-probe it.

Fast on 2 CPU cores because everything that is not the question is cut away: the videos of two
Moving Digits folders (``vidssl footage digits``) are decoded once into memory (cached next to
labels.csv), SSL batches are cut from them in-process by a compact re-implementation of the
loader's rules (context + future from one draw, the other window from an independent draw; random
resized crop, brightness/contrast/saturation jitter, grayscale, channel order). It is not the
loader's code (vidssl.data.augment differs in details such as a per-frame contrast mean and the
draw order), which is why the chosen recipe is confirmed through ``vidssl demo``. A plain AdamW loop trains :class:`vidssl.models.SSLModel` (the same objectives ``vidssl
pretrain`` runs), and the probe is a logistic regression on standardised frozen features (one
centre clip per video, eval-mode backbone) of the *held-out* videos, for the motion and the digit
label, at random initialisation and after pretraining. One line per run is appended to
``--results`` (JSON). Not the product path: the chosen recipe is confirmed with ``vidssl demo``.

    vidssl footage digits /tmp/lab/train videos=600 seed=0 'sizes=[64x64,80x64,64x48]' 'fps=[12,20,25]' 'seconds=[2.0,3.0]'
    vidssl footage digits /tmp/lab/val videos=270 seed=100 'sizes=[64x64,80x64,64x48]' 'fps=[12,20,25]' 'seconds=[2.0,3.0]'
    python tools/ssl_lab.py --train /tmp/lab/train --val /tmp/lab/val --steps 400 --width 16 \
        --chan_perm 1 --gray_p 0.5 --obj '{"future": {"enabled": false}, "contrast": {"negatives": "batch+reversed"}}'
"""
import argparse, csv, json, math, random, time
from pathlib import Path
import numpy as np
import torch
import torch.nn.functional as F

torch.set_num_threads(2)
MOT = ("left", "right", "up", "down", "bounce", "rotate_cw", "rotate_ccw", "zoom_in", "zoom_out")


def load(folder, size=64):
    cache = Path(folder) / f"cache{size}.pt"
    if cache.exists():
        return torch.load(cache)
    import av
    vids, labels, digits = [], [], []
    for row in csv.DictReader(open(Path(folder) / "labels.csv")):
        with av.open(str(Path(folder) / row["path"])) as c:
            fr = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        x = torch.from_numpy(np.stack(fr)).permute(0, 3, 1, 2).float()  # T C H W
        h, w = x.shape[-2:]
        s = size / min(h, w)
        x = F.interpolate(x, size=(round(h * s), round(w * s)), mode="area")
        h, w = x.shape[-2:]
        t, l = (h - size) // 2, (w - size) // 2
        x = x[..., t:t + size, l:l + size].round().clamp(0, 255).to(torch.uint8)
        vids.append(x); labels.append(MOT.index(row["motion"])); digits.append(int(row["digit"]))
    d = {"v": vids, "y": torch.tensor(labels), "d": torch.tensor(digits)}
    torch.save(d, cache)
    return d


def crop_resize(x, box, size):
    t, l, h, w = box
    x = x[..., t:t + h, l:l + w].float()
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def rand_box(rng, H, W, scale):
    a = H * W * rng.uniform(*scale)
    r = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    w = min(W, int(round(math.sqrt(a * r)))); h = min(H, int(round(math.sqrt(a / r))))
    return rng.randint(0, H - h), rng.randint(0, W - w), h, w


def colour(x, rng, a):
    # x float (T C H W) 0..255
    if rng.random() < a.jitter_p:
        b = rng.uniform(1 - a.jitter, 1 + a.jitter); c = rng.uniform(1 - a.jitter, 1 + a.jitter)
        s = rng.uniform(1 - a.jitter, 1 + a.jitter)
        x = x * b
        m = x.mean(); x = (x - m) * c + m
        g = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]
        x = (x - g) * s + g
    if rng.random() < a.gray_p:
        g = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]
        x = g.expand_as(x)
    if a.chan_perm and rng.random() < 0.5:
        x = x[:, torch.randperm(3)]
    return x.clamp(0, 255)


def idx_fit(idx, n):
    return [min(max(i, 0), n - 1) for i in idx]


def ssl_batch(data, rng, a):
    B, T, Fu, S = a.batch, a.frames, a.future, a.crop
    ctx, fut, oth = [], [], []
    for _ in range(B):
        v = data["v"][rng.randrange(len(data["v"]))]
        n = v.shape[0]
        st = a.stride
        span = (T + Fu) * st
        t0 = rng.randint(0, max(0, n - span))
        c_idx = idx_fit([t0 + i * st for i in range(T)], n)
        f_idx = idx_fit([t0 + (T + i) * st for i in range(Fu)], n)
        gap = rng.randint(a.gap_min, a.gap_max) * rng.choice([-1, 1])
        o0 = min(max(t0 + gap, 0), max(0, n - T * st))
        o_idx = idx_fit([o0 + i * st for i in range(T)], n)
        H, W = v.shape[-2:]
        box = rand_box(rng, H, W, a.scale)
        cf = crop_resize(v[c_idx + f_idx], box, S)
        cf = colour(cf, rng, a)
        box2 = rand_box(rng, H, W, a.scale)
        o = colour(crop_resize(v[o_idx], box2, S), rng, a)
        ctx.append(cf[:T]); fut.append(cf[T:]); oth.append(o)
    to8 = lambda L: torch.stack(L).round().to(torch.uint8)
    return {"context": to8(ctx), "future": to8(fut), "other": to8(oth)}


@torch.no_grad()
def features(backbone, data, a, mean, std, clips=1):
    from vidssl.models.base import clips_to_input
    backbone.eval()
    out = []
    for v in data["v"]:
        n = v.shape[0]
        T = a.frames
        span = (T - 1) * a.stride + 1
        starts = [int(round(x)) for x in np.linspace(0, max(0, n - span), clips + 2)[1:-1]] if clips > 1 else [max(0, (n - span) // 2)]
        fs = []
        for s0 in starts:
            x = v[idx_fit([s0 + i * a.stride for i in range(T)], n)]
            x = crop_resize(x, (4, 4, 56, 56), a.crop).round().to(torch.uint8)[None]  # B T C H W
            inp = clips_to_input(x, mean, std)
            fs.append(backbone.forward_tokens(inp).mean(dim=(1, 2)))
        out.append(torch.stack(fs).mean(0)[0])
    return torch.stack(out).numpy()


def probe(ftr, ytr, fva, yva):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    sc = StandardScaler().fit(ftr)
    clf = LogisticRegression(max_iter=3000, C=1.0).fit(sc.transform(ftr), ytr)
    return float(clf.score(sc.transform(fva), yva)), float(clf.score(sc.transform(ftr), ytr))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--future", type=int, default=4)
    p.add_argument("--stride", type=int, default=1)
    p.add_argument("--gap_min", type=int, default=4)
    p.add_argument("--gap_max", type=int, default=16)
    p.add_argument("--crop", type=int, default=56)
    p.add_argument("--scale", type=float, nargs=2, default=(0.5, 1.0))
    p.add_argument("--jitter", type=float, default=0.4)
    p.add_argument("--jitter_p", type=float, default=0.8)
    p.add_argument("--gray_p", type=float, default=0.2)
    p.add_argument("--chan_perm", type=int, default=0)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--norm", default="batch")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--obj", default="{}", help="objectives overrides json")
    p.add_argument("--tag", default="")
    p.add_argument("--clips", type=int, default=1)
    p.add_argument("--train", required=True, help="footage folder (labels.csv) of the pretraining and probe-training videos")
    p.add_argument("--val", required=True, help="footage folder of the held-out probe-test videos")
    p.add_argument("--results", default="ssl_lab.jsonl", help="JSON lines file the results are appended to")
    a = p.parse_args()
    random.seed(a.seed); torch.manual_seed(a.seed)
    from vidssl.models.config import ModelConfig, ObjectivesConfig
    from vidssl.models.ssl import SSLModel
    tr = load(a.train); va = load(a.val)
    mc = ModelConfig(backbone="cnn3d_small", backbone_kwargs={"width": a.width, "norm": a.norm})
    base = {"future": {"target": "latent", "loss": "infonce", "predictor_dim": 64, "predictor_heads": 4, "proj_dim": 64},
            "contrast": {"proj_dim": 64, "proj_hidden": 128}}
    over = json.loads(a.obj)
    for k, v in over.items():
        base.setdefault(k, {}).update(v)
    oc = ObjectivesConfig.from_dict(base)
    model = SSLModel(mc, oc)
    res = {"args": vars(a)}
    t0 = time.time()
    f0tr = features(model.backbone, tr, a, mc.mean, mc.std, a.clips)
    f0va = features(model.backbone, va, a, mc.mean, mc.std, a.clips)
    res["random"] = probe(f0tr, tr["y"].numpy(), f0va, va["y"].numpy())
    res["random_digit"] = probe(f0tr, tr["d"].numpy(), f0va, va["d"].numpy())[0]
    if a.steps:
        opt = torch.optim.AdamW(model.trainable_parameters(), lr=a.lr, weight_decay=0.05)
        rng = random.Random(a.seed)
        model.train()
        log = []
        for step in range(a.steps):
            lr = a.lr * min(1, (step + 1) / 20) * (0.5 * (1 + math.cos(math.pi * step / a.steps)))
            for g in opt.param_groups: g["lr"] = lr
            b = ssl_batch(tr, rng, a)
            out = model(b)
            opt.zero_grad(); out["loss"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step(); model.on_after_step()
            model.train()
            if step % 25 == 0 or step == a.steps - 1:
                row = {k: round(float(v), 3) for k, v in out.items()}
                log.append(row)
                print(step, row, f"{time.time()-t0:.0f}s", flush=True)
        res["log"] = log
        ftr = features(model.backbone, tr, a, mc.mean, mc.std, a.clips)
        fva = features(model.backbone, va, a, mc.mean, mc.std, a.clips)
        res["ssl"] = probe(ftr, tr["y"].numpy(), fva, va["y"].numpy())
        res["ssl_digit"] = probe(ftr, tr["d"].numpy(), fva, va["d"].numpy())[0]
    res["secs"] = round(time.time() - t0)
    print("RESULT", a.tag, json.dumps({k: v for k, v in res.items() if k not in ("log", "args")}), flush=True)
    with open(a.results, "a") as f:
        f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()

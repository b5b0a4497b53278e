"""Backbones, registry, input conversion, heads and the model config section."""

from __future__ import annotations

import pytest
import torch

from vidssl.config import ConfigError
from vidssl.errors import UserError
from vidssl.models import (
    ClassificationHead,
    HeadConfig,
    InputShapeError,
    ModelConfig,
    VideoClassifier,
    available_backbones,
    build_backbone,
    build_backbone_from_config,
    build_classifier,
    clips_to_input,
)

# Two clip sizes per backbone, kept tiny for CPU: (B, C, T, H, W). ViTs need T % 2 == 0 and H, W % 16 == 0.
SIZES = {
    "cnn3d_small": [(2, 3, 4, 32, 32), (1, 3, 8, 64, 48)],
    "r3d_18": [(2, 3, 4, 32, 32), (1, 3, 9, 32, 48)],
    "r2plus1d_18": [(2, 3, 4, 32, 32), (1, 3, 9, 32, 48)],
    "mc3_18": [(2, 3, 4, 32, 32), (1, 3, 3, 32, 48)],
    "vit_tiny": [(2, 3, 4, 32, 32), (1, 3, 6, 48, 32)],
    "vit_small": [(2, 3, 2, 32, 32), (1, 3, 4, 16, 48)],
    "vit_base": [(1, 3, 2, 32, 32), (1, 3, 4, 16, 32)],
}


def test_every_registered_backbone_has_test_sizes():
    assert set(available_backbones()) == set(SIZES)


@pytest.fixture(scope="module")
def backbones():
    cache = {}

    def get(name):
        if name not in cache:
            torch.manual_seed(0)
            cache.clear()  # keep at most one big model alive
            cache[name] = build_backbone(name)
        return cache[name]

    return get


@pytest.mark.parametrize("name", sorted(SIZES))
def test_backbone_shapes_backward_grads_bf16(name, backbones):
    net = backbones(name)
    net.train()
    d = net.embed_dim
    for shape in SIZES[name]:
        b, _, t = shape[:3]
        x = torch.randn(*shape)
        feats = net.forward_features(x)
        assert feats.shape == (b, net.out_steps(t), d), (shape, feats.shape)
        assert net.forward_pooled(x).shape == (b, d)
        tokens = net.forward_tokens(x)
        assert tokens.shape[:2] == (b, net.out_steps(t)) and tokens.shape[3] == d
    # Backward from the features of the first size: every parameter gets a finite, non-None gradient.
    net.zero_grad(set_to_none=True)
    x = torch.randn(*SIZES[name][0])
    feats = net.forward_features(x)
    assert torch.isfinite(feats).all()
    (feats.square().mean() + feats.mean()).backward()
    for pname, p in net.named_parameters():
        assert p.grad is not None, f"{name}: {pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: {pname} has a non-finite gradient"
    assert any(p.grad.abs().sum() > 0 for p in net.parameters())
    # bf16 autocast on CPU: runs, finite, and backward works.
    net.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net.forward_features(x)
    assert out.shape == feats.shape
    assert torch.isfinite(out.float()).all()
    out.float().mean().backward()
    assert all(p.grad is not None for p in net.parameters())
    # Conv3d weight gradients are left out of the bf16 finiteness check: torch 2.15's CPU bf16
    # conv3d backward sporadically writes NaN into a few entries (see docs/models.md).
    for m in net.modules():
        if not isinstance(m, torch.nn.Conv3d):
            assert all(torch.isfinite(p.grad).all() for p in m.parameters(recurse=False)), m
    net.zero_grad(set_to_none=True)


def test_out_steps_matches_forward_for_many_lengths():
    for name, lengths in {"cnn3d_small": range(1, 10), "r3d_18": range(1, 18), "mc3_18": (1, 5)}.items():
        net = build_backbone(name).eval()
        with torch.no_grad():
            for t in lengths:
                assert net.forward_features(torch.randn(1, 3, t, 16, 16)).shape[1] == net.out_steps(t), (name, t)


def test_vit_positions_learnable_resize_and_sincos():
    torch.manual_seed(0)
    net = build_backbone("vit_tiny", depth=1, num_frames=4, img_size=32)  # reference grid 2x2x2
    assert net.pos.shape == (2, 2, 2, 192)
    # At the reference grid the table is used as is; elsewhere it is resized (still learnable).
    assert torch.equal(net.pos_embed(2, 2, 2, "cpu", torch.float32), net.pos.reshape(8, 192))
    assert net.pos_embed(3, 4, 1, "cpu", torch.float32).shape == (12, 192)
    out = net.forward_features(torch.randn(1, 3, 6, 64, 16))  # grid 3x4x1
    out.sum().backward()
    assert net.pos.grad is not None and net.pos.grad.abs().sum() > 0
    fixed = build_backbone("vit_tiny", depth=1, pos_embed="sincos")
    assert not any("pos" in n for n, _ in fixed.named_parameters())
    p1 = fixed.pos_embed(2, 3, 3, "cpu", torch.float32)
    assert p1.shape == (18, 192)
    assert len({tuple(r.tolist()) for r in p1}) == 18  # every token position distinct


def test_vit_rejects_clip_sizes_that_do_not_divide():
    net = build_backbone("vit_tiny", depth=1)
    with pytest.raises(InputShapeError, match="multiple of 2"):
        net.forward_features(torch.randn(1, 3, 3, 32, 32))
    with pytest.raises(InputShapeError, match="multiples of 16"):
        net.forward_features(torch.randn(1, 3, 2, 32, 40))
    with pytest.raises(InputShapeError, match=r"expected float \(B, 3, T, H, W\)"):
        net.forward_features(torch.randn(1, 4, 2, 32, 32))
    with pytest.raises(InputShapeError, match="clips_to_input"):
        net.forward_features(torch.zeros(1, 3, 2, 32, 32, dtype=torch.uint8))


def test_registry_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"^model\.backbone: got 'resnet9000'; allowed: .*r3d_18"):
        build_backbone("resnet9000")
    with pytest.raises(ConfigError, match=r"model\.backbone_kwargs\.depthh: unknown option for backbone "
                                          r"'vit_tiny'; allowed: .*depth"):
        build_backbone("vit_tiny", depthh=2)
    with pytest.raises(ConfigError, match=r"model\.backbone_kwargs\.pos_embed: got 'rope'; allowed"):
        build_backbone("vit_tiny", pos_embed="rope")
    with pytest.raises(ConfigError, match=r"model\.backbone_kwargs\.norm: got 'layer'"):
        build_backbone("cnn3d_small", norm="layer")
    with pytest.raises(ConfigError, match=r"model\.backbone_kwargs\.width: got 0"):
        build_backbone("cnn3d_small", width=0)


def test_model_config_validation_names_key_path():
    cfg = ModelConfig.from_dict({"backbone": "vit_tiny", "backbone_kwargs": {"depth": 1}}, _path="model")
    net = build_backbone_from_config(cfg)
    assert len(net.blocks) == 1
    with pytest.raises(ConfigError, match=r"^model\.backbone: got 'vit_huge'; allowed: "):
        ModelConfig.from_dict({"backbone": "vit_huge"}, _path="model")
    with pytest.raises(ConfigError, match=r"^model\.mean: got \[0\.5, 0\.5\]; expected 3 values"):
        ModelConfig.from_dict({"mean": [0.5, 0.5]}, _path="model")
    with pytest.raises(ConfigError, match=r"^model\.std: got 0\.0; allowed: > 0"):
        ModelConfig.from_dict({"std": [0.2, 0.0, 0.2]}, _path="model")
    with pytest.raises(ConfigError, match=r"^model\.head\.kind: got 'deep'"):
        ModelConfig.from_dict({"head": {"kind": "deep"}}, _path="model")
    with pytest.raises(ConfigError, match=r"^model\.head\.dropout: got 1\.0; allowed: >= 0\.0, < 1\.0"):
        ModelConfig.from_dict({"head": {"dropout": 1.0}}, _path="model")
    bad = ModelConfig.from_dict({"backbone": "cnn3d_small", "backbone_kwargs": {"widht": 8}}, _path="model")
    with pytest.raises(ConfigError, match=r"^model\.backbone_kwargs\.widht: unknown option .* allowed: norm, "
                                          r"weights_path, width"):
        build_backbone_from_config(bad)


def test_weights_path_loads_torchvision_state_dict(tmp_path):
    from torchvision.models.video import mc3_18

    torch.manual_seed(1)
    tv = mc3_18(weights=None, num_classes=400)  # a torchvision checkpoint, classifier included
    path = tmp_path / "mc3.pth"
    torch.save(tv.state_dict(), path)
    net = build_backbone("mc3_18", weights_path=str(path))
    for k, v in net.state_dict().items():
        assert torch.equal(v, tv.state_dict()[k]), k
    # Same features as torchvision's own trunk.
    tv.eval()
    net.eval()
    x = torch.randn(1, 3, 4, 32, 32)
    with torch.no_grad():
        ref = tv.layer4(tv.layer3(tv.layer2(tv.layer1(tv.stem(x)))))  # (1, 512, T', h, w)
        assert torch.allclose(net.forward_features(x), ref.mean(dim=(3, 4)).transpose(1, 2), atol=1e-5)


def test_weights_path_round_trip_and_errors(tmp_path):
    torch.manual_seed(2)
    src = build_backbone("cnn3d_small", width=4)
    path = tmp_path / "ckpt.pt"
    # Wrapped the way training checkpoints are: {"model": {"module.<key>": ...}}.
    torch.save({"model": {f"module.{k}": v for k, v in src.state_dict().items()}}, path)
    cfg = ModelConfig.from_dict({"backbone_kwargs": {"width": 4}, "weights_path": str(path)}, _path="model")
    dst = build_backbone_from_config(cfg)
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in dst.state_dict().items())

    with pytest.raises(UserError, match=r"model\.weights_path: weights file .*nope\.pt' does not exist"):
        build_backbone("cnn3d_small", weights_path=str(tmp_path / "nope.pt"))
    with pytest.raises(UserError, match=r"does not match backbone SmallCNN3d: unexpected 21 keys \(e.g. stages.0.1.running_mean"):
        build_backbone("cnn3d_small", weights_path=str(path), width=4, norm="group")
    with pytest.raises(UserError, match=r"has shape .* backbone expects"):
        build_backbone("cnn3d_small", weights_path=str(path), width=8)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match=r"cannot read .*junk\.pt' as a torch state dict"):
        build_backbone("cnn3d_small", weights_path=str(junk))


def test_weights_keyword_is_a_local_path_like_weights_path(tmp_path):
    # build_backbone(name, weights=...) (torchvision's keyword): a local file, or None; never a download.
    from torchvision.models.video import mc3_18

    torch.manual_seed(3)
    tv = mc3_18(weights=None, num_classes=10)
    path = tmp_path / "mc3.pth"
    torch.save(tv.state_dict(), path)
    for given in (path, str(path)):
        net = build_backbone("mc3_18", weights=given)
        assert all(torch.equal(v, tv.state_dict()[k]) for k, v in net.state_dict().items())
    random = build_backbone("mc3_18", weights=None)
    assert not torch.equal(random.state_dict()["stem.0.weight"], tv.state_dict()["stem.0.weight"])
    with pytest.raises(UserError, match=r"weights file .*nope\.pth' does not exist"):
        build_backbone("mc3_18", weights=tmp_path / "nope.pth")
    with pytest.raises(UserError, match=r"is a folder; expected a state dict file"):
        build_backbone("mc3_18", weights=tmp_path)
    with pytest.raises(ConfigError, match=r"got both weights=.* and weights_path="):
        build_backbone("mc3_18", weights=str(path), weights_path=str(path))
    with pytest.raises(ConfigError, match=r"weights=True \(bool\); expected a local state dict file path or None"):
        build_backbone("mc3_18", weights=True)
    torch.save({"fc.weight": torch.zeros(3, 512)}, tmp_path / "head_only.pth")
    with pytest.raises(UserError, match=r"does not match backbone VideoResNetBackbone: missing"):
        build_backbone("mc3_18", weights=tmp_path / "head_only.pth")


def test_config_errors_are_value_errors():
    # Callers that catch ValueError for bad values (the standard exception) see config errors too.
    with pytest.raises(ValueError, match=r"model\.backbone: got 'resnet9000'; allowed: cnn3d_small"):
        build_backbone("resnet9000")
    with pytest.raises(ValueError, match=r"model\.head\.dropout"):
        ModelConfig.from_dict({"head": {"dropout": 2.0}}, _path="model")


def test_clips_to_input_layout_and_values():
    clips = torch.randint(0, 256, (2, 5, 3, 4, 6), dtype=torch.uint8)  # (B, T, C, H, W)
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.25, 0.5)
    x = clips_to_input(clips, mean, std)
    assert x.shape == (2, 3, 5, 4, 6) and x.dtype == torch.float32 and x.is_contiguous()
    for c in range(3):
        ref = (clips[:, :, c].float() / 255 - mean[c]) / std[c]  # (B, T, H, W)
        assert torch.allclose(x[:, c], ref, atol=1e-5)
    assert torch.allclose(clips_to_input(clips, (0.5,), (0.5,)), clips.permute(0, 2, 1, 3, 4) / 127.5 - 1, atol=1e-5)
    with pytest.raises(InputShapeError, match="uint8"):
        clips_to_input(clips.float())
    with pytest.raises(InputShapeError, match=r"5 dims \(B, T, C, H, W\)"):
        clips_to_input(clips[0])
    with pytest.raises(InputShapeError, match="mean/std: need 1 or 3 values"):
        clips_to_input(clips, (0.5, 0.5), (0.5, 0.5))


def test_classification_heads_and_classifier():
    feats = torch.randn(4, 32)
    lin = ClassificationHead(32, 5)
    mlp = ClassificationHead(32, 5, kind="mlp", hidden_dim=16, dropout=0.5)
    assert lin(feats).shape == (4, 5) and mlp(feats).shape == (4, 5)
    assert sum(p.numel() for p in mlp.parameters()) == 32 * 16 + 16 + 16 * 5 + 5
    with pytest.raises(ValueError, match="kind: got 'conv'"):
        ClassificationHead(32, 5, kind="conv")

    cfg = ModelConfig(backbone_kwargs={"width": 4, "norm": "batch"}, head=HeadConfig(kind="mlp", hidden_dim=8))
    clf = build_classifier(cfg, num_classes=3)
    clips = torch.randint(0, 256, (2, 4, 3, 32, 32), dtype=torch.uint8)  # loader layout
    logits = clf(clips)
    assert logits.shape == (2, 3)
    logits.sum().backward()
    assert all(p.grad is not None for p in clf.parameters())

    # Linear probe: frozen backbone gets no gradient and keeps its BatchNorm statistics.
    clf.zero_grad(set_to_none=True)
    probe = VideoClassifier(clf.backbone, ClassificationHead(32, 3), freeze_backbone=True).train()
    assert not probe.backbone.training
    before = {k: v.clone() for k, v in probe.backbone.state_dict().items()}
    probe(clips).sum().backward()
    assert all(p.grad is None for p in probe.backbone.parameters())
    assert all(p.grad is not None for p in probe.head.parameters())
    assert all(torch.equal(v, before[k]) for k, v in probe.backbone.state_dict().items())


def test_backbone_kwargs_from_command_line_overrides_are_typed():
    from vidssl.config import parse_config_args

    cfg = parse_config_args(ModelConfig, ["backbone=vit_tiny", "backbone_kwargs.depth=1",
                                          "backbone_kwargs.drop_path=0.1", "backbone_kwargs.pos_embed=sincos"])
    net = build_backbone_from_config(cfg)
    assert len(net.blocks) == 1 and net.blocks[0].drop_path == 0.0 and net.pos_kind == "sincos"
    bad = parse_config_args(ModelConfig, ["backbone_kwargs.width=wide"])
    with pytest.raises(ConfigError, match=r"^model\.backbone_kwargs\.width: got 'wide'; expected int \(default 32\)"):
        build_backbone_from_config(bad)


def test_bench_models_cli_smoke(tmp_path, capsys):
    import json

    from vidssl.cli import main

    out = tmp_path / "bench.json"
    code = main(["bench", "models", "--backbones", "vit_tiny", "--repeats", "1", "--warmup", "0", "--batch", "2",
                 "--frames", "2", "--size", "16", "--activation-checkpointing", "--json", str(out)])
    assert code == 0
    res = json.loads(out.read_text())
    names = [r["backbone"] for r in res["results"]]
    # The baseline is always measured in the same run; only the ViT recomputes its blocks.
    assert names == ["cnn3d_small", "vit_tiny", "vit_tiny+ckpt"]
    assert all(r["fwd_bwd_ms_per_clip"] > 0 and r["kept_mb_per_clip"] > 0 for r in res["results"])
    kept = {r["backbone"]: r["kept_mb_per_clip"] for r in res["results"]}
    assert kept["vit_tiny+ckpt"] < kept["vit_tiny"]
    assert res["results"][0]["fwd_bwd_ratio_vs_baseline"] == 1.0
    assert "vit_tiny" in capsys.readouterr().out
    assert main(["bench", "models", "--backbones", "vit_tiny", "--frames", "3"]) == 2
    assert "ViT backbones need an even number of frames" in capsys.readouterr().err
    assert main(["bench", "models", "--backbones", "resnet9000"]) == 2
    assert "unknown backbone 'resnet9000'" in capsys.readouterr().err


# ---- activation checkpointing -----------------------------------------------------------------

def test_activation_checkpointing_gives_the_same_gradients_and_keeps_far_fewer_activations():
    from vidssl.bench.models import saved_bytes

    x = torch.randn(2, 3, 4, 64, 64)
    results = {}
    for on in (False, True):
        torch.manual_seed(0)
        net = build_backbone("vit_tiny", depth=4, img_size=64, num_frames=4, drop_path=0.3).train()
        net.set_activation_checkpointing(on)
        torch.manual_seed(1)  # the same stochastic-depth masks on both sides (and again in the recompute)
        out = []
        saved = saved_bytes(lambda: out.append(net.forward_features(x)), net)
        out = out[0]
        out.square().mean().backward()
        results[on] = (saved, out.detach(), {n: p.grad.clone() for n, p in net.named_parameters()})
    (s_off, y_off, g_off), (s_on, y_on, g_on) = results[False], results[True]
    torch.testing.assert_close(y_on, y_off, rtol=0, atol=0)
    for n in g_off:
        torch.testing.assert_close(g_on[n], g_off[n], rtol=1e-5, atol=1e-7, msg=lambda m, n=n: f"{n}: {m}")
    assert s_on < 0.25 * s_off, (s_on, s_off)  # only the block inputs stay: ~4x-10x less here
    # Without gradients (inference, EMA targets) nothing is recomputed and the output is the same.
    with torch.no_grad():
        torch.manual_seed(1)
        torch.testing.assert_close(net.eval().forward_features(x), net.forward_features(x))


def test_activation_checkpointing_is_refused_for_backbones_that_cannot_recompute():
    net = build_backbone_from_config(ModelConfig(backbone="vit_tiny", backbone_kwargs={"depth": 1},
                                                 activation_checkpointing=True))
    assert net.checkpoint_blocks
    with pytest.raises(ConfigError, match=r"model.activation_checkpointing: backbone 'cnn3d_small' does not "
                                          r"support it \(the built-in ones that do: vit_tiny, vit_small, vit_base"):
        build_backbone_from_config(ModelConfig(backbone="cnn3d_small", activation_checkpointing=True))

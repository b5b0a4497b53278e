"""Typed configuration: round trips, YAML extends, overrides, and every error path."""

from __future__ import annotations

from typing import Any, Literal, Optional

import pytest

from vidssl.config import (Config, ConfigError, dataclass, field, load_config, load_yaml, parse_config_args,
                           parse_size, spec)


@dataclass(kw_only=True)
class OptimSection(Config):
    lr: float = field(default=1e-3, metadata=spec(gt=0, help="learning rate"))
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata=spec(ge=0, lt=1))
    schedule: Literal["cosine", "constant"] = "cosine"


@dataclass(kw_only=True)
class TrainSection(Config):
    steps: int = field(default=100, metadata=spec(ge=1))
    bf16: bool = True
    crops: list[int] = field(default_factory=lambda: [224, 112], metadata=spec(ge=16))
    name: Optional[str] = None
    optim: OptimSection = field(default_factory=OptimSection)

    def validate(self) -> None:
        if self.name == "forbidden":
            raise ConfigError(self._key("name") + ": got 'forbidden'; pick another name")


@dataclass(kw_only=True)
class RootConfig(Config):
    seed: int = 0
    mode: str = field(default="ssl", metadata=spec(choices=("ssl", "clip")))
    train: TrainSection = field(default_factory=TrainSection)


def test_defaults_and_yaml_round_trip(tmp_path):
    cfg = load_config(RootConfig, overrides=["train.optim.lr=3e-4", "train.crops=[64,32]", "train.name=run1"])
    assert cfg.train.optim.lr == pytest.approx(3e-4)
    assert cfg.train.crops == [64, 32]
    text = cfg.to_yaml()
    path = tmp_path / "resolved.yaml"
    cfg.save(path)
    again = load_config(RootConfig, path)
    assert again == cfg
    assert again.to_yaml() == text
    assert isinstance(again.train.optim.betas, tuple)


def test_yaml_extends_and_override_order(tmp_path):
    (tmp_path / "base.yaml").write_text("seed: 1\ntrain:\n  steps: 10\n  optim:\n    lr: 0.1\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\ntrain:\n  optim:\n    schedule: constant\n")
    cfg = load_config(RootConfig, tmp_path / "child.yaml", ["seed=5"])
    assert cfg.seed == 5  # override beats file
    assert cfg.train.steps == 10  # inherited from the parent file
    assert cfg.train.optim.lr == 0.1 and cfg.train.optim.schedule == "constant"  # deep merge


@dataclass(kw_only=True)
class AppConfig(Config):
    # A section whose default differs from its class defaults (as the demo's sections do).
    train: TrainSection = field(default_factory=lambda: TrainSection(steps=7, optim=OptimSection(lr=0.5)))


def test_partial_section_override_keeps_the_fields_own_defaults(tmp_path):
    cfg = load_config(AppConfig, overrides=["train.bf16=false"])
    assert cfg.train.steps == 7 and cfg.train.optim.lr == 0.5 and cfg.train.bf16 is False
    (tmp_path / "c.yaml").write_text("train:\n  optim:\n    schedule: constant\n")
    cfg = load_config(AppConfig, tmp_path / "c.yaml")
    assert cfg.train.optim.lr == 0.5 and cfg.train.optim.schedule == "constant" and cfg.train.steps == 7
    assert AppConfig.from_dict(cfg.to_dict()) == cfg


def test_yaml_scientific_notation_is_a_float(tmp_path):
    # PyYAML's YAML 1.1 resolver reads "3e-4" as a string; a float field must still accept it.
    (tmp_path / "c.yaml").write_text("train:\n  optim:\n    lr: 3e-4\n")
    assert load_config(RootConfig, tmp_path / "c.yaml").train.optim.lr == pytest.approx(3e-4)


@pytest.mark.parametrize("text,expected", [("False", False), ("false", False), ("0", False), ("no", False),
                                           ("True", True), ("yes", True), ("1", True)])
def test_bool_overrides_parse_by_type(text, expected):
    # VideoMAE's argparse type=bool turned "False" into True; ours must not.
    assert load_config(RootConfig, overrides=[f"train.bf16={text}"]).train.bf16 is expected


@dataclass(kw_only=True)
class KwSection(Config):
    kwargs: dict[str, Any] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)


def test_mapping_fields_from_the_command_line():
    cfg = load_config(KwSection, overrides=["kwargs={width: 8, norm: group}", "kwargs.depth=3", "sizes.a=4"])
    assert cfg.kwargs == {"width": 8, "norm": "group", "depth": 3}
    assert cfg.sizes == {"a": 4}
    with pytest.raises(ConfigError, match=r"sizes\.a: got 'big' \(str\); expected an integer"):
        load_config(KwSection, overrides=["sizes.a=big"])
    with pytest.raises(ConfigError, match=r"kwargs: got '3'; expected mapping"):
        load_config(KwSection, overrides=["kwargs=3"])


def test_optional_override_none():
    assert load_config(RootConfig, overrides=["train.name=run", "train.name=null"]).train.name is None


@pytest.mark.parametrize("overrides,needles", [
    (["train.stepz=3"], ["train.stepz", "unknown key", "did you mean 'steps'"]),
    (["bogus.x=1"], ["bogus", "unknown key", "allowed keys"]),
    (["train.steps=ten"], ["train.steps", "'ten'", "integer"]),
    (["train.steps=0"], ["train.steps", "got 0", ">= 1"]),
    (["train.optim.lr=-1"], ["train.optim.lr", "-1", "> 0"]),
    (["train.optim.lr=fast"], ["train.optim.lr", "'fast'", "number"]),
    (["train.bf16=maybe"], ["train.bf16", "'maybe'", "boolean"]),
    (["mode=video"], ["mode", "'video'", "'ssl'", "'clip'"]),
    (["train.optim.schedule=linear"], ["train.optim.schedule", "'linear'", "'cosine'"]),
    (["train.crops=[64,8]"], ["train.crops", "8", ">= 16"]),
    (["train.optim.betas=[0.9]"], ["train.optim.betas", "expected list of 2"]),
    (["train.name=forbidden"], ["train.name", "forbidden"]),
    (["train.optim=3"], ["train.optim", "mapping"]),
])
def test_bad_values_name_key_value_and_allowed(overrides, needles):
    with pytest.raises(ConfigError) as info:
        load_config(RootConfig, overrides=overrides)
    msg = str(info.value)
    for needle in needles:
        assert needle in msg, (needle, msg)


@pytest.mark.parametrize("item,needle", [
    ("train.steps", "expected KEY=VALUE"),
    ("=3", "bad key"),
    ("train..steps=3", "bad key"),
    ("seed.x=3", "seed: is a single value (int), not a section"),
])
def test_bad_override_syntax(item, needle):
    with pytest.raises(ConfigError) as info:
        parse_config_args(RootConfig, [item]) if "=" in item else load_config(RootConfig, overrides=[item])
    assert needle in str(info.value)


def test_yaml_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(RootConfig, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(RootConfig, bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(RootConfig, lst)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("train:\n  steps: 2.5\n")
    with pytest.raises(ConfigError, match=r"train\.steps: got 2\.5"):
        load_config(RootConfig, wrong)
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("extends: b.yaml\n")
    b.write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(RootConfig, a)


def test_yaml_key_given_twice_is_an_error_but_merge_keys_still_work(tmp_path):
    # PyYAML silently keeps the last of two equal keys; a config typo like that must not pass.
    dup = tmp_path / "dup.yaml"
    dup.write_text("seed: 1\ntrain:\n  steps: 5\n  steps: 7\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml' line 4: not valid YAML \(key 'steps' given twice "
                                          r"\(first on line 3\)\)"):
        load_config(RootConfig, dup)
    top = tmp_path / "top.yaml"
    top.write_text("seed: 1\nmode: clip\nseed: 2\n")
    with pytest.raises(ConfigError, match=r"key 'seed' given twice"):
        load_config(RootConfig, top)
    merged = tmp_path / "merged.yaml"  # an explicit key may override one merged in with <<
    merged.write_text("base: &b {steps: 3, bf16: false}\n")
    assert load_yaml(merged) == {"base": {"steps": 3, "bf16": False}}
    merged.write_text("train:\n  <<: {steps: 3, bf16: false}\n  steps: 4\n")
    cfg = load_config(RootConfig, merged)
    assert (cfg.train.steps, cfg.train.bf16) == (4, False)


def test_parse_config_args_rejects_stray_arguments(tmp_path):
    with pytest.raises(ConfigError, match="unexpected argument 'oops'"):
        parse_config_args(RootConfig, ["oops"])
    (tmp_path / "x.yaml").write_text("seed: 2\n")
    (tmp_path / "y.yaml").write_text("seed: 3\n")
    with pytest.raises(ConfigError, match="more than one config file"):
        parse_config_args(RootConfig, [str(tmp_path / "x.yaml"), str(tmp_path / "y.yaml")])
    assert parse_config_args(RootConfig, [str(tmp_path / "x.yaml"), "mode=clip"]).seed == 2


def test_direct_construction_and_assignment_are_validated():
    with pytest.raises(ConfigError, match="steps: got 0"):
        TrainSection(steps=0)
    with pytest.raises(TypeError):
        TrainSection(5)  # keyword-only
    t = TrainSection()
    with pytest.raises(ConfigError, match="steps"):
        t.steps = -3
    assert t.steps == 100
    t.steps = 7
    assert t.steps == 7


def test_cross_field_checks_hold_on_assignment():
    from vidssl.data import DataConfig

    cfg = DataConfig(dataset="x")
    with pytest.raises(ConfigError, match="decode_device: got 'cuda' with decode_stage 'worker'"):
        cfg.decode_device = "cuda"  # once accepted, then silently decoded on the CPU
    assert cfg.decode_device == "cpu"  # the refused assignment left the section as it was
    cfg.decode_stage = "main"
    cfg.decode_device = "cuda"
    with pytest.raises(ConfigError, match="decode_stage=main"):
        cfg.decode_stage = "worker"
    assert (cfg.decode_stage, cfg.decode_device) == ("main", "cuda")
    with pytest.raises(ConfigError, match="gap_min"):
        cfg.gap_min = cfg.gap_max + 1


def test_cross_section_checks_hold_on_assignment_to_a_nested_section():
    """A section's assignment is also checked by the sections holding it (fine-tuning needs data.mode
    clip), after pickling, copying and replace too, and a refused one leaves the value as it was."""
    import copy
    import pickle

    from vidssl.train.config import FinetuneConfig

    cfg = FinetuneConfig()
    for c in (cfg, pickle.loads(pickle.dumps(cfg)), copy.deepcopy(cfg), cfg.replace(train={"max_steps": 5})):
        with pytest.raises(ConfigError, match="data.mode: got 'ssl'; fine-tuning trains on one clip"):
            c.data.mode = "ssl"
        assert c.data.mode == "clip"
        c.data.frames = 4  # allowed by both sections
        assert c.data.frames == 4
    # A section replaced by another is no longer checked against cfg's current one.
    data = cfg.data
    cfg.data = data.replace(frames=6)
    data.mode = "ssl"
    assert cfg.data.mode == "clip"


def test_replace_and_field_help():
    cfg = RootConfig().replace(seed=9)
    assert cfg.seed == 9
    rows = {name: (tp, default, help) for name, tp, default, help in OptimSection.field_help()}
    assert rows["lr"] == ("float", 1e-3, "learning rate")


@pytest.mark.parametrize("text,value", [("512MB", 512_000_000), ("1GiB", 2**30), ("100", 100), (4096, 4096),
                                        ("1.5 GB", 1_500_000_000)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["abc", "-5MB", "0", "12XB"])
def test_parse_size_errors(text):
    with pytest.raises(ConfigError, match="shard_size: got"):
        parse_size(text, "shard_size")

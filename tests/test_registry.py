"""Backbone registry: names are registered once (opt-in replace), validated, and listed in one place."""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap

import pytest

from vidssl.config import ConfigError
from vidssl.errors import UserError
from vidssl.models import ModelConfig, build_backbone, build_backbone_from_config, registry
from vidssl.models.base import VideoBackbone
from vidssl.models.registry import RegistryError, builtin_backbones, register_backbone

# Every built-in, with options that keep it small for CPU (resnets take none).
SMALL = {"cnn3d_small": {"width": 4}, "vit_tiny": {"depth": 1}, "vit_small": {"depth": 1}, "vit_base": {"depth": 1}}


@pytest.fixture
def clean_registry():
    """Restore the registry afterwards: names a test registers vanish, replaced built-ins come back.

    Built-in modules are imported first: one imported during the test would register its names
    only once per process, so dropping them afterwards would lose them for good."""
    for module in set(registry._BUILTIN.values()):
        importlib.import_module(module)
    builders, origins = dict(registry._BUILDERS), dict(registry._ORIGINS)
    yield registry
    registry._BUILDERS.clear()
    registry._BUILDERS.update(builders)
    registry._ORIGINS.clear()
    registry._ORIGINS.update(origins)


def _tiny(width: int = 4):
    from vidssl.models.cnn3d import SmallCNN3d

    return SmallCNN3d(width=width)


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)


# ---- registering -----------------------------------------------------------------------------------

def test_a_custom_name_builds_through_build_backbone_and_the_config(clean_registry):
    @register_backbone("test_reg-custom_1")
    def custom(*, width: int = 8):
        return _tiny(width)

    assert registry._BUILDERS["test_reg-custom_1"] is custom
    assert "test_reg-custom_1" in registry.available_backbones()
    net = build_backbone("test_reg-custom_1", width="4")  # typed like its default, as from a CLI override
    assert isinstance(net, VideoBackbone) and net.embed_dim == 32
    cfg = ModelConfig(backbone="test_reg-custom_1", backbone_kwargs={"width": 2})
    assert build_backbone_from_config(cfg).embed_dim == 16


def test_a_taken_name_is_refused_naming_both_sides(clean_registry):
    @register_backbone("test_reg_dup")
    def first(*, width: int = 8):
        return _tiny(width)

    def second(*, width: int = 8):
        return _tiny(width)

    with pytest.raises(RegistryError) as err:
        register_backbone("test_reg_dup")(second)
    msg = str(err.value)
    assert "'test_reg_dup' is already registered by" in msg
    assert f"{__name__}.test_a_taken_name_is_refused_naming_both_sides.<locals>.first" in msg  # where it comes from
    assert "<locals>.second cannot register it" in msg
    assert "replace=True" in msg
    assert isinstance(err.value, UserError) and isinstance(err.value, ValueError)  # CLI: one line, exit 2
    assert registry._BUILDERS["test_reg_dup"] is first  # not overwritten


@pytest.mark.parametrize("name,module", [("cnn3d_small", "vidssl.models.cnn3d"), ("r3d_18", "vidssl.models.resnet3d"),
                                         ("vit_base", "vidssl.models.vit")])
def test_a_builtin_name_is_refused(clean_registry, name, module):
    before = registry._BUILDERS.get(name)
    with pytest.raises(RegistryError, match=rf"'{name}' is .*{module}.*replace=True"):
        register_backbone(name)(lambda **kw: _tiny())
    assert registry._BUILDERS.get(name) is before


def test_replace_is_an_explicit_opt_in(clean_registry):
    register_backbone("test_reg_repl")(lambda *, width=8: _tiny(width))
    register_backbone("test_reg_repl", replace=True)(lambda *, width=2: _tiny(width))
    assert build_backbone("test_reg_repl").embed_dim == 16
    # a built-in too
    build_backbone("cnn3d_small")  # its module is imported
    register_backbone("cnn3d_small", replace=True)(lambda *, width=2: _tiny(width))
    assert build_backbone("cnn3d_small").embed_dim == 16
    # ... and a replacement can be replaced again only with the opt-in
    with pytest.raises(RegistryError, match="already registered by"):
        register_backbone("cnn3d_small")(lambda: _tiny())


def test_a_builtin_module_registers_its_own_name_exactly_once(clean_registry):
    del registry._BUILDERS["cnn3d_small"]  # as before vidssl.models.cnn3d is imported

    def cnn3d_small(*, width: int = 4):
        return _tiny(width)

    cnn3d_small.__module__, cnn3d_small.__qualname__ = "vidssl.models.cnn3d", "cnn3d_small"
    wrong = lambda: _tiny()  # noqa: E731
    wrong.__module__ = "vidssl.models.vit"
    with pytest.raises(RegistryError, match="built-in backbone"):
        register_backbone("cnn3d_small")(wrong)  # another built-in module may not take it
    register_backbone("cnn3d_small")(cnn3d_small)
    assert registry._BUILDERS["cnn3d_small"] is cnn3d_small
    with pytest.raises(RegistryError, match="already registered by vidssl.models.cnn3d.cnn3d_small"):
        register_backbone("cnn3d_small")(cnn3d_small)


@pytest.mark.parametrize("name", ["", " ", "my net", "vit_tiny ", "a\tb", "a\nb", "a.b", "model.backbone", "1net",
                                  "_x", "a,b", "a=b", "a/b", "a:b", "[a]", "ä", "null", "true", "No", "off"])
def test_invalid_names_are_refused(clean_registry, name):
    with pytest.raises(RegistryError, match=r"invalid backbone name"):
        register_backbone(name)
    assert name not in registry._BUILDERS


@pytest.mark.parametrize("name", [None, 3, b"net", ("a",)])
def test_a_name_must_be_a_str(clean_registry, name):
    with pytest.raises(RegistryError, match="expected a str"):
        register_backbone(name)


def test_valid_names_are_accepted(clean_registry):
    for name in ("n", "Net3D", "my-net_2", "x-"):
        register_backbone(name)(lambda: _tiny())
        assert name in registry.available_backbones()


# ---- built-ins ---------------------------------------------------------------------------------------

def test_builtins_all_build_from_their_own_modules():
    assert builtin_backbones() == list(registry._BUILTIN)
    assert set(SMALL) <= set(builtin_backbones())
    assert builtin_backbones("vidssl.models.resnet3d") == ["r3d_18", "r2plus1d_18", "mc3_18"]
    for name in builtin_backbones():
        net = build_backbone(name, **SMALL.get(name, {}))
        assert isinstance(net, VideoBackbone), name
        assert registry._BUILDERS[name].__module__ == registry._BUILTIN[name]
        del net


def test_lazy_builtins_refuse_early_names_and_keep_an_explicit_replacement():
    """In a fresh process (built-in modules not imported yet): a built-in name is refused before its
    module is imported; an explicit replacement survives the later import of the module."""
    res = _run("""
        import sys
        from vidssl.models import registry
        from vidssl.models.registry import RegistryError, build_backbone, register_backbone
        assert "vidssl.models.vit" not in sys.modules and "torch" not in sys.modules
        try:
            register_backbone("vit_tiny")(lambda: None)
        except RegistryError as exc:
            assert "built-in backbone (from vidssl.models.vit)" in str(exc), exc
        else:
            raise AssertionError("vit_tiny was taken before vidssl.models.vit was imported")
        mine = lambda *, width=2: __import__("vidssl.models.cnn3d").models.cnn3d.SmallCNN3d(width=width)
        register_backbone("vit_tiny", replace=True)(mine)
        import vidssl.models.vit, vidssl.models.vit  # noqa: registers vit_small/vit_base, keeps vit_tiny
        assert registry._BUILDERS["vit_tiny"] is mine
        assert build_backbone("vit_tiny").embed_dim == 16
        assert build_backbone("vit_small", depth=1).embed_dim == 384
        assert registry._BUILDERS["vit_base"].__module__ == "vidssl.models.vit"
        print("ok")
    """)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]


# ---- one list of names -------------------------------------------------------------------------------

def _backbone_help() -> str:
    import dataclasses

    return next(f.metadata["help"] for f in dataclasses.fields(ModelConfig) if f.name == "backbone")


def test_backbone_help_lists_every_builtin():
    text = _backbone_help()
    assert all(name in text for name in builtin_backbones())
    assert "register_backbone" in text


def test_backbone_help_derives_from_the_registry_without_torch():
    res = _run("""
        import dataclasses, sys
        from vidssl.models import registry
        registry._BUILTIN["zz_probe_net"] = "nowhere"
        from vidssl.models.config import ModelConfig
        text = next(f.metadata["help"] for f in dataclasses.fields(ModelConfig) if f.name == "backbone")
        assert "zz_probe_net" in text, text
        assert "torch" not in sys.modules
        print("ok")
    """)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]


def test_an_unknown_backbone_lists_the_registered_names(clean_registry):
    register_backbone("test_reg_listed")(lambda: _tiny())
    with pytest.raises(ConfigError, match=r"backbone: got 'nope'; allowed: .*test_reg_listed"):
        ModelConfig(backbone="nope")

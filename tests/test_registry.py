import pytest

from mner_bench.config import resolve_config
from mner_bench.decoders import CrfDecoderConfig
from mner_bench.errors import ConfigError, PluginError, UnknownNameError
from mner_bench.hookspecs import hookimpl
from mner_bench.registry import ComponentSpec, build_registry, get_registry


def test_builtin_plugins_register_through_entry_points():
    reg = get_registry()
    plugins = {name for name, _ in reg.pm.list_name_plugin()}
    assert {"core", "baselines", "tracking", "progress"} <= plugins
    assert reg.get("method", "bertcrf").plugin == "baselines"
    assert reg.get("decoder", "crf").plugin == "core"
    assert reg.list_components("method", "bert*") == ["bert", "bertcrf"]
    assert reg.spec("dataset", "t15").name == "twitter2015"


def test_unknown_name_lists_what_exists_and_the_closest():
    with pytest.raises(UnknownNameError) as err:
        get_registry().spec("method", "bertcfr")
    msg = str(err.value)
    assert "Did you mean 'bertcrf'?" in msg and "bert, bertcrf" in msg


def test_duplicate_names_fail_naming_both_plugins():
    class Dup:
        @hookimpl
        def mner_bench_decoders(self):
            return [ComponentSpec("crf", CrfDecoderConfig, lambda cfg: None)]

    with pytest.raises(PluginError) as err:
        build_registry(extra_plugins=(("thirdparty", Dup()),))
    assert "'core'" in str(err.value) and "'thirdparty'" in str(err.value)


def test_plugin_with_unknown_hook_fails_naming_it():
    class Bad:
        @hookimpl
        def mner_bench_decoderz(self):
            return []

    with pytest.raises(PluginError, match="plugin 'broken'.*mner_bench_decoderz"):
        build_registry(extra_plugins=(("broken", Bad()),))


def test_plugin_with_wrong_hook_arguments_fails_naming_it():
    class Bad:
        @hookimpl
        def mner_bench_epoch_end(self, run, epoch, metrics, surprise):
            pass

    with pytest.raises(PluginError, match="plugin 'args'"):
        build_registry(extra_plugins=(("args", Bad()),))


def test_plugin_returning_the_wrong_type_fails():
    class Bad:
        @hookimpl
        def mner_bench_methods(self):
            return ["not a spec"]

    with pytest.raises(PluginError, match="plugin 'wrongtype'.*MethodSpec"):
        build_registry(extra_plugins=(("wrongtype", Bad()),))


# --------------------------------------------------------------------------- config


def test_config_defaults_follow_the_paper():
    cfg = resolve_config(get_registry(), "bertcrf")
    assert cfg.train.lr == 3e-5 and cfg.train.batch_size == 16 and cfg.train.epochs == 30
    assert cfg.train.warmup_ratio == 0.01 and cfg.data.max_length == 128
    assert cfg.decoder.type == "crf" and cfg.text_encoder.name == "all-MiniLM-L6-v2"


def test_config_merge_order_file_then_overrides_then_cli(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 1.0e-4\n  epochs: 7\nseed: 5\n")
    cfg = resolve_config(get_registry(), "bertcrf", f, ["train.epochs=9", "seed=6"], {"seed": 8})
    assert cfg.train.lr == 1e-4 and cfg.train.epochs == 9 and cfg.seed == 8


@pytest.mark.parametrize(
    "override, needle",
    [("train.lrr=1", "train.lrr"), ("decoder.foo=1", "decoder.foo"), ("train.epochs=many", "train.epochs"),
     ("decoder.type=crff", "Did you mean 'crf'"), ("data.dataset=t16", "unknown dataset 't16'"),
     ("data.shots=0", "positive")],
)
def test_bad_config_names_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        resolve_config(get_registry(), "bertcrf", None, [override])


def test_unknown_key_in_a_config_file_names_the_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  nope: 1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'train.nope'"):
        resolve_config(get_registry(), "bertcrf", f)


def test_component_type_switch_takes_that_components_schema():
    cfg = resolve_config(get_registry(), "bertcrf", None, ["decoder.type=softmax"])
    assert cfg.decoder.type == "softmax"


def test_data_set_run_defaults_sit_between_method_defaults_and_overrides():
    reg = get_registry()
    assert resolve_config(reg, "bertcrf", None, [], {"data.dataset": "synth-ambiguous"}).train.epochs == 10
    assert resolve_config(reg, "bertcrf", None, ["data.dataset=synth-ambiguous", "train.epochs=3"]).train.epochs == 3
    assert resolve_config(reg, "bertcrf", None, [], {"data.dataset": "t15"}).train.epochs == 30


def test_a_plugin_that_fails_to_import_is_named(monkeypatch):
    import mner_bench.registry as reg_mod

    class BrokenEntryPoint:
        name = "shiny"
        value = "shiny_plugin.hooks"

        def load(self):
            raise ImportError("No module named 'shiny_plugin'")

    monkeypatch.setattr(reg_mod, "_plugin_entry_points", lambda: [BrokenEntryPoint()])
    with pytest.raises(PluginError, match=r"plugin 'shiny' \(shiny_plugin.hooks\) could not be imported"):
        build_registry()

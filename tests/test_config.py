"""YAML configs: base inheritance, dotted overrides, and errors that name the key and the file."""
from pathlib import Path

import pytest

from ms_nlp_compress.config import ExperimentConfig, NezhaConfig, apply_overrides, dump_config, load_config
from ms_nlp_compress.errors import ConfigError

CONFIGS = Path(__file__).resolve().parent.parent / "ascend_configs"


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_shipped_config_loads(name):
    if name.startswith("compress_"):  # a `msnc compress` pipeline: its stage configs must load too
        from ms_nlp_compress.pipeline.config import PipelineConfig, stage_config_path

        pipeline = load_config(CONFIGS / name, cls=PipelineConfig)
        for stage in pipeline.specs():
            if stage.config:
                assert isinstance(load_config(stage_config_path(CONFIGS / name, stage), stage.set), ExperimentConfig)
        return
    config = load_config(CONFIGS / name)
    assert isinstance(config, ExperimentConfig)


def test_inheritance_chain_and_overrides():
    config = load_config(CONFIGS / "ascend910_8p.yaml", ["model.num_layers=4", "data.batch_size=16",
                                                         "runtime.cpu_threads=null"])
    assert config.parallel.world_size == 8  # own value
    assert config.runtime.precision == "O2" and config.runtime.device == "ascend"  # from ascend910_1p.yaml
    assert config.model.hidden_size == 384  # from common.yaml
    assert config.model.num_layers == 4 and config.data.batch_size == 16  # overrides
    assert config.model.hidden_dropout == 0.1  # dataclass default


def test_deep_merge_keeps_sibling_keys(tmp_path):
    (tmp_path / "a.yaml").write_text("model:\n  hidden_size: 64\n  num_heads: 4\n  intermediate_size: 99\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nmodel:\n  num_heads: 8\n")
    config = load_config(tmp_path / "b.yaml")
    assert (config.model.hidden_size, config.model.num_heads, config.model.intermediate_size) == (64, 8, 99)


@pytest.mark.parametrize("text,message", [
    ("model:\n  num_layer: 4\n", r"unknown key\(s\) model.num_layer"),
    ("modle:\n  num_layers: 4\n", r"unknown key\(s\) modle"),
    ("model:\n  num_layers: four\n", "model.num_layers: expected an integer"),
    ("model:\n  num_layers: 4.5\n", "model.num_layers: expected an integer"),
    ("model:\n  num_layers: 0\n", "model.num_layers: must be > 0"),
    ("runtime:\n  device: tpu\n", "runtime.device: must be one of"),
    ("runtime:\n  graph_kernel_fusion: 'yes'\n", "runtime.graph_kernel_fusion: expected true/false"),
    ("model:\n  layer_num_heads: [1, x]\n", r"model.layer_num_heads\[1\]: expected an integer"),
    ("data: 3\n", "data: expected a mapping"),
    ("- 1\n- 2\n", "top level must be a mapping"),
    ("model: [\n", "invalid YAML"),
])
def test_bad_files_name_key_and_file(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_bad_overrides_are_named():
    with pytest.raises(ConfigError, match="model.num_layrs"):
        load_config(CONFIGS / "cpu_demo.yaml", ["model.num_layrs=3"])
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_overrides({}, ["model.num_layers"])
    with pytest.raises(ConfigError, match="--set model.hidden_act=swish"):
        load_config(CONFIGS / "cpu_demo.yaml", ["model.hidden_act=swish"])


def test_missing_and_circular_bases(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="nowhere.yaml: config file not found"):
        load_config(tmp_path / "c.yaml")


def test_cross_field_rule():
    with pytest.raises(ConfigError, match="runtime.precision"):
        load_config(CONFIGS / "cpu_demo.yaml", ["parallel.world_size=2", "runtime.precision=O2"])


def test_dump_round_trip(tmp_path):
    config = load_config(CONFIGS / "nezha_tiny_cpu.yaml", ["model.layer_intermediate_sizes=[10, 20]"])
    dump_config(config, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == config


def test_nezha_config_from_dict_rejects_unknown_keys():
    with pytest.raises(ConfigError, match="model.hiden_size"):
        NezhaConfig.from_dict({"hiden_size": 3}, "x.json")

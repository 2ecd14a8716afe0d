from pathlib import Path

import pytest

from sqjax.config import load_config

CONFIGS = Path(__file__).parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.py")), ids=lambda p: p.stem)
def test_every_config_loads(path):
    config = load_config(path)
    assert config.model.name
    assert config.train.batch_size > 0


def test_overrides_are_parsed_and_typed():
    c = load_config(
        CONFIGS / "demo.py",
        [
            "--config.train.num_steps=7",
            "--config.train.learning_rate=1",
            "--config.model.name=resnet34",
            "--config.quant.bits_list=(2,4)",
            "--config.data.synth=False",
        ],
    )
    assert c.train.num_steps == 7
    assert c.train.learning_rate == 1.0 and isinstance(c.train.learning_rate, float)
    assert c.model.name == "resnet34"
    assert c.quant.bits_list == (2, 4)
    assert c.data.synth is False


def test_override_errors_name_the_key():
    with pytest.raises(KeyError, match="train.num_stepz"):
        load_config(CONFIGS / "demo.py", ["--config.train.num_stepz=3"])
    with pytest.raises(TypeError, match="num_steps is int"):
        load_config(CONFIGS / "demo.py", ["--config.train.num_steps=abc"])
    with pytest.raises(ValueError, match="expected --config"):
        load_config(CONFIGS / "demo.py", ["--config.train.num_steps"])
    with pytest.raises(FileNotFoundError, match="nope.py"):
        load_config(CONFIGS / "nope.py")


def test_string_and_sequence_overrides_keep_their_types():
    c = load_config(
        CONFIGS / "demo.py", ["--config.data.synth_dir=2024", "--config.quant.keep_float=['a']"]
    )
    assert c.data.synth_dir == "2024"
    assert c.quant.keep_float == ("a",)

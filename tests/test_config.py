import ast
from pathlib import Path

import pytest

from sqjax.config import default_config, load_config
from sqjax.models import PRESETS

CONFIGS = Path(__file__).parents[1] / "configs"


def _keys(d: dict, prefix: str = "") -> set[str]:
    """Dotted paths of the leaves of a nested dict."""
    out = set()
    for k, v in d.items():
        out |= _keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}"}
    return out


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.py")), ids=lambda p: p.stem)
def test_every_config_loads(path):
    config = load_config(path)
    # Only settings sqjax reads: a misspelt key (c.train.num_step = 5) would be ignored.
    assert _keys(config.to_dict()) == _keys(default_config().to_dict())
    assert config.model.name in PRESETS
    assert config.train.batch_size % config.train.microbatches == 0
    # big_vision style: the docstring holds the command that runs this config.
    doc = ast.get_docstring(ast.parse(path.read_text()))
    assert f"--config configs/{path.name}" in doc


def test_a_misspelt_key_in_a_config_file_is_caught(tmp_path):
    # The check above, on a config that sets a key nothing reads.
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from sqjax.config import default_config\n\n\n"
        "def get_config():\n    c = default_config()\n    c.train.num_step = 5\n    return c\n"
    )
    keys = _keys(load_config(bad).to_dict()) - _keys(default_config().to_dict())
    assert keys == {"train.num_step"}


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

"""Security rules over the package source: weights through safetensors or
torch.load(weights_only=True), YAML through safe_load, no eval/exec, remote code only on request."""

import re
from pathlib import Path

SRC = sorted((Path(__file__).parent.parent / "adapterbench").rglob("*.py"))


def lines(pattern: str):
    rx = re.compile(pattern)
    return [f"{p.name}:{i}: {line.strip()}" for p in SRC for i, line in enumerate(p.read_text().splitlines(), 1)
            if rx.search(line)]


def test_sources_found():
    assert len(SRC) > 10


def test_torch_load_only_weights_only():
    calls = lines(r"torch\.load\(")
    assert calls and all("weights_only=True" in c for c in calls), calls


def test_yaml_safe_load_only():
    """YAML is read only by safe loaders: safe_load, or config.StrictLoader (a SafeLoader that
    also refuses duplicate keys and alias bombs); never yaml.load with another loader."""
    import yaml

    from adapterbench.config import StrictLoader
    assert issubclass(StrictLoader, yaml.SafeLoader)
    assert not lines(r"yaml\.(unsafe_load|full_load)\(")
    assert not [line for line in lines(r"yaml\.load\(") if "Loader=StrictLoader)" not in line]
    assert lines(r"Loader=StrictLoader\)")


def test_no_eval_or_exec():
    assert not lines(r"(?<![\w.])(eval|exec)\(")


def test_remote_code_only_when_asked():
    assert not lines(r"trust_remote_code\s*=\s*True")
    from adapterbench.config import ModelConfig
    assert ModelConfig().trust_remote_code is False

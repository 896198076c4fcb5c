"""ModelConfig validation: each bad field raises ChimeraError naming that field."""

import dataclasses
import re

import pytest

from chimera.config import ModelConfig, validate_model
from chimera.errors import ChimeraError

MOE = ModelConfig(d_model=64, num_heads=4, num_experts=4, top_k=2)


def test_valid_configs_pass():
  validate_model(ModelConfig())
  validate_model(MOE)
  validate_model(dataclasses.replace(MOE, top_k=4))  # k = E is allowed


@pytest.mark.parametrize("changes,field", [
    (dict(top_k=5), "model.top_k"),
    (dict(top_k=0), "model.top_k"),
    (dict(capacity_factor=0.0), "model.capacity_factor"),
    (dict(capacity_factor=-1.0), "model.capacity_factor"),
    (dict(eval_capacity_factor=0.0), "model.eval_capacity_factor"),
    (dict(d_model=66), "model.d_model"),
])
def test_bad_field_is_named(changes, field):
  with pytest.raises(ChimeraError, match="^" + re.escape(f"config.{field}:")):
    validate_model(dataclasses.replace(MOE, **changes))


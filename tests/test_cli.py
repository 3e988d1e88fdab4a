"""experiments._cli.write_json: the file holds the value or the previous one, never half."""

import json

import numpy as np
import pytest

from experiments import _cli


def test_write_json_converts_with_default_and_replaces_the_file(tmp_path):
  path = tmp_path / "results.json"
  path.write_text('{"old": true}')
  _cli.write_json(path, {"a": np.float32(1.5), "b": [np.int64(3)]}, indent=1,
                  default=lambda x: x.item())
  assert json.loads(path.read_text()) == {"a": 1.5, "b": [3]}
  assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_write_json_failing_midway_keeps_the_previous_file(tmp_path):
  path = tmp_path / "results.json"
  _cli.write_json(path, {"seeds": 5})
  with pytest.raises(TypeError):  # the second key is not JSON: json.dump stops half way
    _cli.write_json(path, {"first": 1, "second": object()})
  assert json.loads(path.read_text()) == {"seeds": 5}

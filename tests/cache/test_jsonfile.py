"""Strict JSON: no NaN or Infinity is ever written; a null says why."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cache import jsonfile
from cache.atomic import write_json
from cache.jsonfile import Undefined


def test_undefined_and_non_finite_values_become_null_with_their_reason():
    record = {"dead": Undefined("run shorter than the dead-latent window (10 of 20 tokens)"), "fvu": float("nan"),
              "rate": np.float32(np.inf), "n": np.int64(3), "curve": [1.0, float("-inf")],
              "nested": {"x": np.array([0.5, np.nan])}, "given": float("nan"), "given_why": "no images"}
    out = jsonfile.loads(jsonfile.dumps(record))
    assert out["dead"] is None and out["dead_why"] == "run shorter than the dead-latent window (10 of 20 tokens)"
    assert out["fvu"] is None and "nan" in out["fvu_why"] and out["rate"] is None and "inf" in out["rate_why"]
    assert out["n"] == 3 and out["curve"] == [1.0, None] and "-inf" in out["curve_why"]
    assert out["nested"] == {"x": [0.5, None], "x_why": "null entries: was nan: not a finite number"}
    assert out["given"] is None and out["given_why"] == "no images"  # the caller's reason is kept


def test_the_strict_parser_refuses_what_python_writes_by_default():
    for constant in ("NaN", "Infinity", "-Infinity"):
        with pytest.raises(ValueError, match=constant):
            jsonfile.loads(json.dumps({"x": float(constant.replace("Infinity", "inf"))}))


def test_write_json_writes_strict_json(tmp_path):
    write_json(tmp_path / "m.json", {"a": float("nan"), "b": np.float64(1.5)})
    assert jsonfile.loads((tmp_path / "m.json").read_text()) == {"a": None, "a_why": "was nan: not a finite number",
                                                                   "b": 1.5}

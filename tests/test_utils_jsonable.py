"""One numpy / jax to JSON rule for checkpoints, metrics, reports and benchmarks."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from dreamprm_jax.utils.jsonable import to_jsonable, write_json


def test_scalars_arrays_and_containers():
    value = {"i": np.int64(3), "f": np.float32(0.5), "b": np.bool_(True), "jb": jnp.array(True),
             "a": np.arange(4).reshape(2, 2), "j": jnp.array([1.5, 2.5]), "t": (1, "x", None), 7: "int key"}
    assert to_jsonable(value) == {"i": 3, "f": 0.5, "b": True, "jb": True, "a": [[0, 1], [2, 3]], "j": [1.5, 2.5],
                                  "t": [1, "x", None], "7": "int key"}
    out = to_jsonable(value)
    assert type(out["i"]) is int and type(out["f"]) is float and type(out["b"]) is bool and type(out["jb"]) is bool


def test_errors_name_the_field():
    with pytest.raises(TypeError, match=r"cfg\.opts\[1\]: value of type object"):
        to_jsonable({"opts": [1, object()]}, where="cfg")
    with pytest.raises(TypeError, match=r"cfg: mapping key \(1, 2\) must be a str"):
        to_jsonable({(1, 2): 0}, where="cfg")
    with pytest.raises(TypeError, match=r"cfg\.s: array of dtype <U1"):
        to_jsonable({"s": np.array(["a"])}, where="cfg")
    with pytest.raises(ValueError, match=r"cfg\.x\[1\]: non-finite float inf"):
        to_jsonable({"x": np.array([1.0, np.inf])}, where="cfg")


def test_nonfinite_null_warns_once_per_field():
    with pytest.warns(RuntimeWarning, match=r"warn_once_field\[0\] is nan"):
        assert to_jsonable([float("nan")], where="warn_once_field", nonfinite="null") == [None]


def test_write_json_is_strict_json(tmp_path):
    path = write_json(tmp_path / "sub" / "r.json", {"b": np.float64(1.0), "a": [np.int32(2)]}, sort_keys=True)
    text = open(path).read()
    assert json.loads(text) == {"a": [2], "b": 1.0} and text.index('"a"') < text.index('"b"') and text.endswith("\n")
    with pytest.raises(ValueError, match="non-finite"):
        write_json(tmp_path / "nan.json", {"x": float("nan")})
    assert not (tmp_path / "nan.json").exists()  # nothing half-written

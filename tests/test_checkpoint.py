"""The shared checkpoint file: round trip, atomic replace, and clear errors."""
import json

import numpy as np
import pytest

from spikelib.checkpoint import FORMAT, VERSION, CheckpointError, load_checkpoint, save_checkpoint


def sample():
    rng = np.random.default_rng(0)
    params = {"embed.weight": rng.standard_normal((5, 3)), "norm_f.weight": np.ones(3)}
    opt = {"m": {k: np.zeros_like(v) + 0.5 for k, v in params.items()},
           "v": {k: np.zeros_like(v) + 0.25 for k, v in params.items()}}
    return params, {"model": {"d_model": 3}, "train": {"step": 7}}, opt


def test_round_trip_keeps_values_config_and_optimizer(tmp_path):
    params, config, opt = sample()
    path = save_checkpoint(tmp_path / "ck.npz", params, config, opt)
    got, cfg, got_opt = load_checkpoint(path, {k: v.shape for k, v in params.items()})
    for k in params:
        assert got[k].dtype == np.float32
        np.testing.assert_array_equal(got[k], params[k].astype(np.float32))
        np.testing.assert_array_equal(got_opt["m"][k], opt["m"][k].astype(np.float32))
    assert cfg["train"]["step"] == 7 and cfg["model"] == {"d_model": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.npz"]  # no temp file left behind


def test_without_optimizer_state(tmp_path):
    params, config, _ = sample()
    _, _, opt = load_checkpoint(save_checkpoint(tmp_path / "ck.npz", params, config))
    assert opt is None


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing"])
def test_damaged_files_raise_clear_errors(tmp_path, damage):
    params, config, opt = sample()
    path = save_checkpoint(tmp_path / "ck.npz", params, config, opt)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"not a checkpoint at all")
    else:
        path.unlink()
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_shape_mismatch_names_the_parameter(tmp_path):
    params, config, _ = sample()
    path = save_checkpoint(tmp_path / "ck.npz", params, config)
    with pytest.raises(CheckpointError, match="embed.weight"):
        load_checkpoint(path, {"embed.weight": (6, 3), "norm_f.weight": (3,)})
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(path, {"embed.weight": (5, 3), "norm_f.weight": (3,), "head.weight": (3, 5)})


def test_foreign_npz_is_rejected(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, x=np.zeros(3))
    with pytest.raises(CheckpointError, match="config.json"):
        load_checkpoint(path)


def write_raw(path, doc, params):
    """A checkpoint file written by hand, so its version can be any number."""
    arrays = {"config.json": np.frombuffer(json.dumps(doc).encode(), dtype=np.uint8)}
    np.savez(path, **arrays, **{"param/" + k: v.astype(np.float32) for k, v in params.items()})
    return path


def test_version_1_files_load_with_the_decays_they_were_trained_with(tmp_path):
    params, config, _ = sample()
    doc = dict(config, format=FORMAT, version=1)
    _, cfg, _ = load_checkpoint(write_raw(tmp_path / "v1.npz", doc, params))
    assert cfg["model"] == {"d_model": 3, "decay_start": 5.0, "decay_step": 1.0}
    doc["model"] = {"d_model": 3, "decay_start": 2.0, "decay_step": 0.5}    # values it names win
    _, cfg, _ = load_checkpoint(write_raw(tmp_path / "v1b.npz", doc, params))
    assert (cfg["model"]["decay_start"], cfg["model"]["decay_step"]) == (2.0, 0.5)
    _, cfg, _ = load_checkpoint(save_checkpoint(tmp_path / "v2.npz", params, config))
    assert cfg["version"] == VERSION == 2 and cfg["model"] == {"d_model": 3}


@pytest.mark.parametrize("version", [0, 3, None])
def test_unknown_versions_are_refused(tmp_path, version):
    params, config, _ = sample()
    path = write_raw(tmp_path / "ck.npz", dict(config, format=FORMAT, version=version), params)
    with pytest.raises(CheckpointError, match="format version"):
        load_checkpoint(path)

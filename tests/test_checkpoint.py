"""The shared checkpoint file: round trip, atomic replace, and clear errors."""
import json
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from spikelib.checkpoint import (
    FORMAT,
    VERSION,
    CheckpointError,
    check_vocab,
    data_ref,
    load_checkpoint,
    save_checkpoint,
    tokenizer_info,
    tokenizer_path,
)
from spikelib.stages import load_stage


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
    _, cfg, _ = load_checkpoint(save_checkpoint(tmp_path / "v3.npz", params, config))
    assert cfg["version"] == VERSION == 4 and cfg["model"] == {"d_model": 3}


def test_version_2_files_load_as_the_model_without_rate_coding(tmp_path):
    """A version-2 file has no rate_coding field: stage 3 builds it with rate_coding false."""
    m = load_stage("3_spike_llm_numpy")
    cfg = m.make_configs("tiny")[0]
    params = m.init_params(cfg)
    model = {k: v for k, v in asdict(cfg).items() if k != "rate_coding"}
    path = write_raw(tmp_path / "v2.npz", {"format": FORMAT, "version": 2, "model": model}, params)
    _, loaded, *_ = m.load_model(path)
    assert loaded.rate_coding is False and loaded == cfg


@pytest.mark.parametrize("version", [0, 5, None])
def test_unknown_versions_are_refused(tmp_path, version):
    params, config, _ = sample()
    path = write_raw(tmp_path / "ck.npz", dict(config, format=FORMAT, version=version), params)
    with pytest.raises(CheckpointError, match="format version"):
        load_checkpoint(path)


@pytest.mark.parametrize("doc, message", [
    ([1, 2], "a JSON list, not an object"),
    ("v2", "a JSON str, not an object"),
    ({"format": FORMAT, "version": "2"}, "version '2', a string; this code reads the number 4"),
    ({"format": FORMAT, "version": True}, "format version True"),
    ({"format": FORMAT, "version": 2, "model": [3]}, '"model" must be a JSON object'),
])
def test_malformed_configs_are_refused_with_one_clear_line(tmp_path, doc, message):
    path = write_raw(tmp_path / "ck.npz", doc, sample()[0])
    with pytest.raises(CheckpointError, match=re.escape(message)) as err:
        load_checkpoint(path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("dtype", [np.int8, np.int32, np.uint8, np.bool_])
def test_non_float_parameters_are_refused(tmp_path, dtype):
    params, config, _ = sample()
    path = write_raw(tmp_path / "ck.npz", dict(config, format=FORMAT, version=VERSION), params)
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["param/embed.weight"] = arrays["param/embed.weight"].astype(dtype)
    np.savez(path, **arrays)
    with pytest.raises(CheckpointError, match=f"param/embed.weight holds {np.dtype(dtype)} values"):
        load_checkpoint(path)


def test_a_model_vocab_smaller_than_the_tokenizers_is_refused():
    check_vocab(2000, 2000)
    check_vocab(2048, 2000)            # spare rows are harmless
    with pytest.raises(CheckpointError, match="vocab_size 64 is smaller than its tokenizer's 2000"):
        check_vocab(64, 2000, "ck.npz")


@pytest.mark.parametrize("tokenizer", [None, "data/x/tokenizer.json", {"sha256": "ab"},
                                       {"path": 3, "sha256": "ab"}])
def test_a_missing_tokenizer_record_is_a_clear_error(tokenizer):
    config = {"model": {}} if tokenizer is None else {"model": {}, "tokenizer": tokenizer}
    with pytest.raises(CheckpointError, match="records no tokenizer"):
        tokenizer_info(config, "ck.npz")


def saved_with_data(tmp_path, monkeypatch):
    """A checkpoint trained in tmp_path/project, referring to data/builtin as the stages do."""
    project = tmp_path / "project"
    (project / "data" / "builtin").mkdir(parents=True)
    (project / "data" / "builtin" / "tokenizer.json").write_text("{}")
    monkeypatch.chdir(project)
    ckpt = Path("out") / "numpy" / "ckpt.npz"
    config = {"model": {}, "tokenizer": {"path": "data/builtin/tokenizer.json", "sha256": "ab"},
              "data": data_ref("data/builtin", ckpt)}
    save_checkpoint(ckpt, sample()[0], config)
    return project, ckpt


def test_the_tokenizer_is_found_from_another_working_folder(tmp_path, monkeypatch):
    project, ckpt = saved_with_data(tmp_path, monkeypatch)
    _, config, _ = load_checkpoint(ckpt)
    assert tokenizer_path(config, ckpt) == Path("data/builtin/tokenizer.json")
    monkeypatch.chdir(tmp_path)
    found = tokenizer_path(config, project / ckpt)
    assert found.resolve() == (project / "data/builtin/tokenizer.json").resolve()


def test_the_tokenizer_is_found_after_moving_checkpoint_and_data_together(tmp_path, monkeypatch):
    project, ckpt = saved_with_data(tmp_path, monkeypatch)
    monkeypatch.chdir(tmp_path)
    moved = shutil.move(str(project), str(tmp_path / "elsewhere"))
    _, config, _ = load_checkpoint(Path(moved) / ckpt)
    found = tokenizer_path(config, Path(moved) / ckpt)
    assert found.resolve() == (Path(moved) / "data/builtin/tokenizer.json").resolve()


def test_a_lost_tokenizer_names_the_paths_tried_and_what_to_pass(tmp_path, monkeypatch):
    project, ckpt = saved_with_data(tmp_path, monkeypatch)
    (project / "data/builtin/tokenizer.json").unlink()
    _, config, _ = load_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match="data/builtin/tokenizer.json.*; pass --data DIR") as err:
        tokenizer_path(config, ckpt, hint="pass --data DIR")
    assert "\n" not in str(err.value)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "tokenizer.json").write_text("{}")
    assert tokenizer_path(config, ckpt, data_dir=tmp_path / "mine") == tmp_path / "mine" / "tokenizer.json"

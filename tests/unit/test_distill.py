"""Distillation from a LightGBM teacher (ranking/distill.py): out-of-fold soft targets, the ``distill:``
train config section, and a training run that softens only the training rows' targets."""
import numpy as np
import pandas as pd
import pytest
import torch

from ranking.distill import Teacher
from ranking.metrics import auc
from strategy.errors import ValidationError

torch.set_num_threads(1)

SPEC = {"name": "t", "features": [
    {"name": "user_id", "type": "id", "column": "user_id", "dim": 4},
    {"name": "prior_score", "type": "dense", "column": "prior_score"},
    {"name": "duration", "type": "dense", "column": "duration", "log1p": True},
]}


def _noise(n, seed):
    """Labels that no feature predicts, and a feature unique per row (a tree can memorise it)."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"row": rng.permutation(n).astype(float), "x": rng.normal(size=n)}), \
        rng.integers(0, 2, size=(n, 1)).astype(float)


def test_teacher_predictions_are_out_of_fold():
    """On labels no feature predicts, in-sample trees memorise the rows; out-of-fold ones cannot."""
    train, y = _noise(4000, 0)
    valid, yv = _noise(1000, 1)
    teacher = Teacher(["click"], ["row", "x"], alpha=0.5, folds=4, max_rounds=60, early_stopping_rounds=1000,
                      num_leaves=63, learning_rate=0.3, min_data_in_leaf=2).fit(train, y, valid, yv)
    assert 1 <= teacher.rounds_["click"] <= 60      # early stopping keeps the best round on the valid rows
    assert abs(teacher.oof_auc_["click"] - 0.5) < 0.04
    from ranking.lgbm import LGBMMultiObjective

    in_sample = LGBMMultiObjective({"click": "binary"}, teacher.params, num_boost_round=60).fit(
        train.assign(click=y[:, 0]), ["row", "x"]).predict(train)[:, 0]
    assert auc(y[:, 0], in_sample) > 0.8             # what the net would have been taught without folds


def test_soft_targets_mix_labels_and_teacher():
    rng = np.random.default_rng(3)
    df = pd.DataFrame({"x": rng.normal(size=3000), "z": rng.normal(size=3000)})
    y = np.stack([rng.random(3000) < 1 / (1 + np.exp(-2 * df.x)), rng.random(3000) < 0.1], axis=1).astype(float)
    teacher = Teacher(["click", "like"], ["x", "z"], alpha=0.3, folds=3, max_rounds=50,
                      early_stopping_rounds=10).fit(df.iloc[:2400], y[:2400], df.iloc[2400:], y[2400:])
    assert teacher.oof_.shape == (2400, 2) and ((teacher.oof_ > 0) & (teacher.oof_ < 1)).all()
    assert teacher.oof_auc_["click"] > 0.75          # x does predict clicks
    np.testing.assert_allclose(teacher.soft_targets(y[:2400]), 0.3 * y[:2400] + 0.7 * teacher.oof_)
    with pytest.raises(ValueError, match="shape"):
        teacher.soft_targets(y[:10])
    d = teacher.describe()
    assert d["alpha"] == 0.3 and set(d["rounds"]) == {"click", "like"} and set(d["oof_auc"]) == {"click", "like"}


@pytest.mark.parametrize("distill, path, words", [
    ({"alpah": 0.5}, "distill.alpah", ["alpha"]),
    ({"alpha": 1.5}, "distill.alpha", ["[0, 1]"]),
    ({"folds": 1}, "distill.folds", ["[2, 100]"]),
    ({"objectives": ["clik"]}, "distill.objectives[0]", ["click", "like"]),
    ({"objectives": ["watch_time"]}, "distill.objectives[0]", ["binary"]),
    ({"objectives": []}, "distill.objectives", ["at least one"]),
    ({"objectives": ["click", "click"]}, "distill.objectives", ["twice"]),
    ("yes", "distill", []),
])
def test_distill_section_is_validated(small_train_config, distill, path, words):
    from ranking.train import load_train_config

    with pytest.raises(ValidationError) as exc:
        load_train_config(small_train_config(SPEC, name="kd", distill=distill)[1])
    errors = {e.path: e.message for e in exc.value.errors}
    assert path in errors, errors
    for w in words:
        assert w in errors[path], errors[path]


def test_training_softens_only_the_training_targets(tmp_path, small_train_config):
    from ranking.artifacts import load_model
    from ranking.train import load_train_config, prepare, train_from_config

    _, path = small_train_config(SPEC, name="kd", distill={"alpha": 0.25, "folds": 3, "max_rounds": 40,
                                                           "early_stopping_rounds": 10})
    cfg = load_train_config(path)
    assert cfg.distill.objectives == ("click", "like")             # default: the binary objectives
    lines = []
    prep = prepare(cfg, log=lines.append)
    assert any(ln.startswith("distill: LightGBM teacher on") for ln in lines)
    rows = pd.read_parquet(tmp_path / "imp.parquet").sort_values("ts", kind="mergesort").iloc[:len(prep.y_train)]
    for j, k in enumerate(("click", "like")):     # 0.25 x label + 0.75 x a teacher probability in (0, 1)
        teach = (prep.y_train[:, j] - 0.25 * rows[k].to_numpy()) / 0.75
        assert ((teach > 0) & (teach < 1)).all() and np.ptp(teach) > 0.01
    np.testing.assert_allclose(prep.y_train[:, 2], np.log1p(rows["watch_time"].to_numpy()), rtol=1e-6)  # untouched
    assert set(np.unique(prep.y_valid[:, :2])) <= {0.0, 1.0}       # validation keeps the true labels
    assert prep.description["distill"]["alpha"] == 0.25

    summary = train_from_config(cfg, log=lambda *a: None, progress=False)
    reg = load_model(tmp_path / "reg", "kd")
    kd = reg.manifest["data"]["distill"]                            # what the teacher was, on record
    assert kd["objectives"] == ["click", "like"] and 1 <= kd["rounds"]["click"] <= 40
    assert reg.leaves is None and sorted(p.name for p in (tmp_path / "reg" / "kd" / summary["version"]).iterdir()) \
        == sorted(reg.manifest["files"])                            # nothing of the teacher is saved or served


def test_a_registered_torchrec_teacher_softens_the_students_training_targets(tmp_path, small_train_config):
    """distill_from: the teacher's served probabilities mixed into the student's training targets."""
    import json

    from ranking.artifacts import load_model
    from ranking.train import load_train_config, prepare, train_from_config

    _, teacher_path = small_train_config(SPEC, name="teacher")
    train_from_config(load_train_config(teacher_path), log=lambda *a: None, progress=False)
    student = json.loads(teacher_path.read_text())
    student.update(name="student", distill_from={"model": "teacher", "alpha": 0.4, "objectives": ["click"]},
                   model={"arch": "shared_bottom", "bottom": [4], "tower": [2]})
    (tmp_path / "student.yaml").write_text(json.dumps(student))
    cfg = load_train_config(tmp_path / "student.yaml")
    lines = []
    prep = prepare(cfg, log=lines.append)
    teacher = load_model(tmp_path / "reg", "teacher")
    rows = pd.read_parquet(tmp_path / "imp.parquet").sort_values("ts", kind="mergesort").iloc[:len(prep.y_train)]
    p = teacher.predict(rows.reset_index(drop=True))[:, 0]
    np.testing.assert_allclose(prep.y_train[:, 0], 0.4 * rows["click"].to_numpy() + 0.6 * p, rtol=1e-5)
    np.testing.assert_allclose(prep.y_train[:, 1], rows["like"].to_numpy())          # not chosen: true labels
    assert prep.description["distill_from"] == {"model": "teacher@v1", "alpha": 0.4, "objectives": ["click"]}
    assert any("distill_from teacher@v1" in ln for ln in lines)
    assert train_from_config(cfg, log=lambda *a: None, progress=False)["version"] == "v1"


@pytest.mark.parametrize("section, path", [
    ({"alpha": 0.5}, "distill_from.model"),
    ({"model": "t", "alpha": 2}, "distill_from.alpha"),
    ({"model": "t", "objectives": ["watch_time"]}, "distill_from.objectives[0]"),
    ({"model": "t", "teacher": 1}, "distill_from.teacher"),
])
def test_distill_from_section_is_validated(small_train_config, section, path):
    from ranking.train import load_train_config

    with pytest.raises(ValidationError) as exc:
        load_train_config(small_train_config(SPEC, name="kd", distill_from=section)[1])
    assert path in {e.path for e in exc.value.errors}


def test_one_teacher_at_a_time(small_train_config):
    from ranking.train import load_train_config

    with pytest.raises(ValidationError) as exc:
        load_train_config(small_train_config(SPEC, name="kd", distill={"alpha": 0.5},
                                             distill_from={"model": "t"})[1])
    assert exc.value.errors[0].path == "distill_from" and "one teacher" in exc.value.errors[0].message

"""Trick 5, multi-task learning on real UTKFace faces: labels from file names, a stable split,
one (N, 7) output for any subset of heads, the lecture's weighted objective (and learned
weights), and a short run end to end through the shared training loop."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from convtricks import config as recipes
from convtricks.data.utkface import FaceLabels, index_faces, load_faces, parse_name, split_of
from convtricks.errors import UserError
from convtricks.models.multitask import COLUMNS
from convtricks.models.registry import create_model
from convtricks.train.freezing import freeze_except
from convtricks.train.multitask import (
    MultiTaskTask,
    evaluate_multitask,
    evaluation_text,
    face_line,
    predict_faces,
    train_multitask_run,
)
from convtricks.train.run import start

MALFORMED = ("61_1_20170109142408075.jpg.chip.jpg", "61_3_20170109150557335.jpg.chip.jpg")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def utkface(shared_data):
    return shared_data / "utkface"


@pytest.fixture(scope="module")
def faces_dir(utkface, tmp_path_factory):
    """48 real faces (every 100th name, so all ages and races appear) plus the two malformed names."""
    folder = tmp_path_factory.mktemp("faces")
    names = sorted(p.name for p in utkface.iterdir() if parse_name(p.name))[::100][:48]
    for name in (*names, *MALFORMED):
        shutil.copyfile(utkface / name, folder / name)
    return folder


class _Records(logging.Handler):
    def __init__(self, level):
        super().__init__(level)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def _listen(level):
    # The project's logger does not propagate to the root (the CLI prints it), so listen on it directly.
    handler = _Records(level)
    logger = logging.getLogger("convtricks")
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(min(level, previous or logging.WARNING))
    yield handler.records
    logger.removeHandler(handler)
    logger.setLevel(previous)


@pytest.fixture
def warnings_logged():
    yield from _listen(logging.WARNING)


@pytest.fixture
def messages_logged():
    yield from _listen(logging.INFO)


# --- data ------------------------------------------------------------------------------------


def test_file_names_give_age_gender_race():
    assert parse_name("25_1_3_20170116174525125.jpg.chip.jpg") == FaceLabels(25, 1, 3)
    assert parse_name("100_0_0_20170112213500903.jpg.chip.jpg") == FaceLabels(100, 0, 0)
    for bad in (*MALFORMED, "25_2_0_20170116174525125.jpg.chip.jpg", "25_1_5_20170116174525125.jpg.chip.jpg",
                "cat.1.jpg", "25_1_3.jpg"):
        assert parse_name(bad) is None, bad


def test_malformed_names_are_skipped_with_one_warning_naming_them(faces_dir, warnings_logged):
    index = index_faces(faces_dir)
    assert sorted(index.skipped) == sorted(MALFORMED)
    assert len(index.paths) == 48 and not any(p.name in MALFORMED for p in index.paths)
    assert len(warnings_logged) == 1
    message = warnings_logged[0].getMessage()
    assert all(name in message for name in MALFORMED)


def test_split_by_name_hash_is_stable_and_follows_the_fractions(utkface):
    names = sorted(p.name for p in utkface.iterdir() if parse_name(p.name))
    first = [split_of(name, (0.7, 0.15, 0.15)) for name in names]
    assert first == [split_of(name, [0.7, 0.15, 0.15]) for name in reversed(names)][::-1]
    for split, fraction in (("train", 0.7), ("validation", 0.15), ("test", 0.15)):
        assert abs(first.count(split) / len(names) - fraction) < 0.02, split
    # Growing the training part keeps every training face in train.
    wider = [split_of(name, (0.8, 0.1, 0.1)) for name in names]
    assert all(w == "train" for w, f in zip(wider, first) if f == "train")


def test_loaded_splits_are_disjoint_uint8_tensors_with_labels_from_names(faces_dir):
    sets = load_faces(faces_dir, (32, 40), (0.6, 0.2, 0.2))
    seen = [p.name for split in sets.values() for p in split.paths]
    assert sorted(seen) == sorted(p.name for p in faces_dir.iterdir() if p.name not in MALFORMED)
    for split, faces in sets.items():
        assert faces.images.dtype == torch.uint8 and faces.images.shape == (len(faces), 3, 32, 40)
        assert all(split_of(p.name, (0.6, 0.2, 0.2)) == split for p in faces.paths)
        expected = [[parse_name(p.name).age, parse_name(p.name).gender, parse_name(p.name).race] for p in faces.paths]
        assert faces.targets.tolist() == expected
    again = load_faces(faces_dir, (32, 40), (0.6, 0.2, 0.2))  # from the content cache
    assert torch.equal(again["train"].images, sets["train"].images)


def test_bad_split_fractions_and_folders_are_user_errors(faces_dir, tmp_path):
    for fractions in ([0.7, 0.2], [0.7, 0.2, 0.2], [0.0, 0.5, 0.5], "half"):
        with pytest.raises(UserError, match="data.split"):
            load_faces(faces_dir, (32, 32), fractions)
    with pytest.raises(UserError, match="does not exist"):
        index_faces(tmp_path / "missing")
    with pytest.raises(UserError, match="no UTKFace images"):
        index_faces(tmp_path)


# --- model -----------------------------------------------------------------------------------


@pytest.mark.parametrize("tasks", [["age"], ["gender"], ["race"], ["age", "gender"], ["age", "gender", "race"]])
def test_output_is_seven_columns_for_every_task_subset(tasks):
    torch.manual_seed(0)
    model = create_model("multitask-faces", tasks=tasks, pretrained="none", input_size=48).eval()
    with torch.no_grad():
        out = model(torch.rand(3, 3, 48, 48))
    assert out.shape == (3, 7)
    heads = {name.split(".")[1] for name, _ in model.named_parameters() if name.startswith("top.")}
    assert heads == set(tasks)  # heads not trained are not built
    for task, columns in COLUMNS.items():
        if task in tasks:
            assert out[:, columns].abs().sum() > 0, task
        else:
            assert torch.equal(out[:, columns], torch.zeros_like(out[:, columns])), task


def test_unknown_tasks_and_weighting_are_user_errors():
    for options in ({"tasks": ["height"]}, {"tasks": []}, {"weighting": "equal"}):
        with pytest.raises(UserError):
            create_model("multitask-faces", pretrained="none", input_size=48, **options)
    with pytest.raises(UserError):
        MultiTaskTask(["age", "height"])
    with pytest.raises(UserError):
        MultiTaskTask(["age"], {"age": 1.0, "height": 2.0})


# --- loss ------------------------------------------------------------------------------------


def _batch(n=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    outputs = torch.randn(n, 7, generator=generator) * 2
    outputs[:, 0] = torch.rand(n, generator=generator) * 80
    targets = torch.stack([torch.randint(0, 90, (n,), generator=generator).float(),
                           torch.randint(0, 2, (n,), generator=generator).float(),
                           torch.randint(0, 5, (n,), generator=generator).float()], dim=1)
    return outputs, targets


def _lecture_losses(outputs, targets):
    """Loss1 (years²), Loss2 (binary cross-entropy), Loss3 (cross-entropy), written out by hand."""
    age = ((outputs[:, 0] - targets[:, 0]) ** 2).mean()
    p = torch.sigmoid(outputs[:, 1])
    gender = -(targets[:, 1] * torch.log(p) + (1 - targets[:, 1]) * torch.log(1 - p)).mean()
    log_probs = torch.log_softmax(outputs[:, 2:7], dim=1)
    race = -log_probs[torch.arange(len(targets)), targets[:, 2].long()].mean()
    return {"age": age, "gender": gender, "race": race}


def test_fixed_weighting_is_loss1_plus_lambda_loss2_plus_gamma_loss3():
    outputs, targets = _batch()
    by_hand = _lecture_losses(outputs, targets)
    task = MultiTaskTask(["age", "gender", "race"], {"age": 0.5, "gender": 200.0, "race": 30.0})
    expected = 0.5 * by_hand["age"] + 200 * by_hand["gender"] + 30 * by_hand["race"]
    assert torch.allclose(task.loss(outputs, targets), expected, rtol=1e-5)
    # A subset trains only its heads: the other columns cannot move the loss.
    subset = MultiTaskTask(["gender", "race"], {"age": 0.5, "gender": 200.0, "race": 30.0})
    scrambled = outputs.clone()
    scrambled[:, 0] = 1e4
    assert torch.allclose(subset.loss(scrambled, targets), 200 * by_hand["gender"] + 30 * by_hand["race"], rtol=1e-5)
    assert "age_mae" not in subset.batch_stats(scrambled, targets)


def test_uncertainty_weighting_uses_and_trains_the_models_log_variances():
    model = create_model("multitask-faces", weighting="uncertainty", pretrained="none", input_size=48)
    model.top.set_age_scale(30.0, 20.0)
    log_vars = model.top.loss_log_vars
    assert torch.allclose(log_vars.detach(), torch.tensor([2 * torch.log(torch.tensor(20.0)), 0.0, 0.0]))
    with torch.no_grad():
        log_vars.copy_(torch.tensor([5.0, -0.5, 0.3]))
    task = MultiTaskTask(["age", "gender", "race"], weighting="uncertainty", log_vars=log_vars)
    outputs, targets = _batch(seed=1)
    by_hand = _lecture_losses(outputs, targets)
    s = log_vars.detach()
    expected = sum(by_hand[t] * torch.exp(-s[i]) + s[i] for i, t in enumerate(("age", "gender", "race")))
    loss = task.loss(outputs, targets)
    assert torch.allclose(loss, expected, rtol=1e-5)
    loss.backward()
    # d/ds (L e^-s + s) = 1 - L e^-s: each weight is pulled towards its task's loss size.
    gradient = torch.stack([1 - by_hand[t] * torch.exp(-s[i]) for i, t in enumerate(("age", "gender", "race"))])
    assert torch.allclose(log_vars.grad, gradient, rtol=1e-4)
    # They live under top., so training the top trains them too.
    freeze_except(model, ["top.*"])
    assert log_vars.requires_grad
    assert task.loss_weights()["age"] == pytest.approx(float(torch.exp(torch.tensor(-5.0))))


def test_batch_stats_are_sums_that_add_over_batches():
    outputs, targets = _batch(n=8, seed=2)
    task = MultiTaskTask(["age", "gender", "race"], {"age": 1.0, "gender": 10.0, "race": 10.0})
    whole = task.batch_stats(outputs, targets)
    halves = [task.batch_stats(outputs[s], targets[s]) for s in (slice(0, 3), slice(3, 8))]
    for name, value in whole.items():
        assert value == pytest.approx(halves[0][name] + halves[1][name], rel=1e-5), name
    assert whole["age_mae"] == pytest.approx(float((outputs[:, 0] - targets[:, 0]).abs().sum()), rel=1e-5)
    assert whole["loss"] / 8 == pytest.approx(float(task.loss(outputs, targets)), rel=1e-5)
    gender_correct = ((outputs[:, 1] > 0).float() == targets[:, 1]).sum()
    assert whole["gender_acc"] == float(gender_correct)
    assert set(task.metric_names) == set(whole) - {"loss"}


# --- a run end to end ------------------------------------------------------------------------

FAST = [("target_size", "64"), ("batch_size", "8"), ("val_batch_size", "16"), ("steps_per_epoch", "2"),
        ("epochs", "1"), ("threads", "1")]


def _start(faces_dir, runs, overrides):
    config = recipes.apply_overrides(recipes.read_recipe("multitask"), FAST + overrides)
    return start(config, faces_dir, runs)


def test_one_epoch_per_stage_trains_evaluates_and_predicts(faces_dir, tmp_path, messages_logged):
    run_dir = _start(faces_dir, tmp_path / "runs", [])
    metrics = train_multitask_run(run_dir)
    said = [r.getMessage() for r in messages_logged]
    # Loading all three splits at once: the malformed names are reported once per run.
    assert sum("AGE_GENDER_RACE" in m for m in said) == 1
    # Both stages train on the frozen part's cached output (the second with mirrors).
    assert sum("cached output" in m for m in said) == 2
    for name in ("config.yaml", "history.csv", "curves.png", "model.safetensors", "best.safetensors",
                 "checkpoint.pt", "metrics.json"):
        assert (run_dir / name).is_file(), name
    history = json.loads((run_dir / "history.json").read_text())
    assert [row["stage"] for row in history] == ["top", "finetune"]
    for key in ("loss", "age_loss", "gender_loss", "race_loss", "age_mae", "gender_acc", "race_acc", "score"):
        assert key in history[-1] and f"val_{key}" in history[-1], key
    # Unweighted, the age loss (years²) dwarfs the other two: the reason for λ and γ.
    assert history[0]["age_loss"] > 20 * max(history[0]["gender_loss"], history[0]["race_loss"])
    assert 0 <= metrics["test_gender_acc"] <= 1 and metrics["test_age_mae"] >= 0
    assert set(metrics["test_race_acc_per_class"]) == {"White", "Black", "Asian", "Indian", "Others"}
    assert sum(map(sum, metrics["test_race_confusion"])) == metrics["test_images"] > 0

    result = evaluate_multitask(run_dir)
    assert result["which"] == "test split" and result["images"] == metrics["test_images"]
    assert result["race_acc"] == pytest.approx(metrics["test_race_acc"])
    assert "age MAE" in evaluation_text(result) and "Others" in evaluation_text(result)
    other = tmp_path / "other_faces"
    other.mkdir()
    for path in sorted(faces_dir.iterdir())[:5]:
        shutil.copyfile(path, other / path.name)
    seen = set((run_dir / "seen_faces.txt").read_text().split())
    new_to_run = [name for name in (p.name for p in other.iterdir()) if name not in seen]
    # Another folder is judged whole, less the faces this run trained or validated on.
    assert evaluate_multitask(run_dir, other)["images"] == len(new_to_run) > 0

    rows = predict_faces(run_dir, faces_dir)
    assert len(rows) == 50  # any image is a face to predict, labelled or not
    row = predict_faces(run_dir, next(faces_dir.glob("*.jpg")))[0]
    assert row["gender"] in ("male", "female") and row["race"] in ("White", "Black", "Asian", "Indian", "Others")
    assert row["age"] >= 0 and 0.5 <= row["gender_probability"] <= 1 and len(row["race_scores"]) == 5
    assert row["race"] in face_line(row) and "age" in face_line(row)


def test_a_subset_with_learned_weights_reports_only_its_heads(faces_dir, tmp_path):
    run_dir = _start(faces_dir, tmp_path / "runs", [("tasks", "age,gender"), ("weighting", "uncertainty")])
    config = recipes.read_recipe("multitask")
    metrics = train_multitask_run(run_dir)
    assert metrics["tasks"] == ["age", "gender"]
    assert not any(key.startswith(("race", "val_race", "test_race")) for key in metrics)
    assert {"age_mae", "gender_acc", "test_age_mae", "test_gender_acc"} <= set(metrics)
    # The learned weights moved away from where they started (age: 1/std², gender: 1).
    assert metrics["loss_weights"]["gender"] != 1.0
    assert config["multitask"]["weighting"] == "fixed"  # the recipe itself is untouched
    row = predict_faces(run_dir, next(faces_dir.glob("*.jpg")))[0]
    assert "age" in row and "gender" in row and "race" not in row


def test_the_command_line_trains_evaluates_and_predicts_faces(faces_dir, tmp_path, capsys):
    from tests.helpers import run_cli

    overrides = [item for pair in FAST for item in (f"--{pair[0]}", pair[1])]
    code, out, err = run_cli(capsys, "train", "multitask", "--data", faces_dir, "--runs", tmp_path, *overrides)
    assert code == 0, err
    (run_dir,) = tmp_path.iterdir()
    code, out, err = run_cli(capsys, "evaluate", run_dir)
    assert code == 0 and "age MAE" in out and "Others" in out
    code, out, err = run_cli(capsys, "predict", run_dir, next(faces_dir.glob("*.jpg")))
    assert code == 0 and "age" in out


def test_the_finetune_recipe_unfreezes_the_whole_base_under_learned_weights(faces_dir, tmp_path, capsys):
    from tests.helpers import run_cli

    overrides = [item for pair in FAST for item in (f"--{pair[0]}", pair[1])]
    code, out, err = run_cli(capsys, "train", "multitask-finetune", "--data", faces_dir, "--runs", tmp_path, *overrides)
    assert code == 0, err
    (run_dir,) = tmp_path.iterdir()
    log_text = (run_dir / "log.txt").read_text()
    assert "Stage 'top'" in log_text and "Stage 'finetune'" in log_text
    finetune_line = next(line for line in log_text.splitlines() if "Stage 'finetune'" in line)
    assert " 0 frozen" in finetune_line  # every layer of the base trains in the second stage
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["weighting"] == "uncertainty" and set(metrics["loss_weights"]) == {"age", "gender", "race"}


def test_evaluating_a_copy_of_the_faces_leaves_out_those_the_run_learned_from(faces_dir, tmp_path, capsys):
    from tests.helpers import run_cli

    overrides = [item for pair in FAST for item in (f"--{pair[0]}", pair[1])]
    code, out, err = run_cli(capsys, "train", "multitask", "--data", faces_dir, "--runs", tmp_path / "runs", *overrides)
    assert code == 0, err
    (run_dir,) = (tmp_path / "runs").iterdir()
    seen = set((run_dir / "seen_faces.txt").read_text().split())
    # The same faces somewhere else (another machine, a copy): only the test split's are new to the run.
    copy = tmp_path / "elsewhere"
    shutil.copytree(faces_dir, copy)
    own = evaluate_multitask(run_dir)
    moved = evaluate_multitask(run_dir, copy)
    readable = [p for p in copy.iterdir() if parse_name(p.name)]
    assert moved["images"] == own["images"] == len(readable) - len(seen)
    assert moved["left_out"] == len(seen) and moved["age_mae"] == pytest.approx(own["age_mae"], rel=1e-5)
    code, out, err = run_cli(capsys, "evaluate", run_dir, "--data", copy)
    assert code == 0 and f"{len(seen)} faces the run trained or validated on were left out" in out
    # A folder holding only faces the run has seen has nothing to score: one sentence, exit 2.
    only_seen = tmp_path / "seen-only"
    only_seen.mkdir()
    for name in list(seen)[:3]:
        shutil.copyfile(faces_dir / name, only_seen / name)
    code, out, err = run_cli(capsys, "evaluate", run_dir, "--data", only_seen)
    assert code == 2 and "nothing in it is new to the model" in err

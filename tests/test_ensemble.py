"""Trick 4, ensembles: bagging subsets, voting, members trained one after another and in
parallel, resuming, and evaluate / predict on an ensemble folder."""

from __future__ import annotations

import csv
import json
import os
import shutil

import pytest
import torch

from convtricks import config as recipes
from convtricks.cli import build_parser, main
from convtricks.errors import UserError
from convtricks.train import ensemble
from convtricks.train import run as run_module
from tests.helpers import run_cli

TINY = ["--epochs", "1", "--steps_per_epoch", "2", "--target_size", "48", "--batch_size", "4",
        "--val_batch_size", "12"]


# --- bagging subsets --------------------------------------------------------------------------


def _labels(cats: int, dogs: int) -> torch.Tensor:
    return torch.tensor([0] * cats + [1] * dogs)


def test_bootstrap_samples_are_deterministic_full_size_draws_with_replacement():
    labels = _labels(20, 20)
    spec = {"kind": "bootstrap", "member": 0, "members": 3, "seed": 7}
    first = ensemble.subset_indices(labels, spec)
    assert torch.equal(first, ensemble.subset_indices(labels, dict(spec)))
    assert len(first) == 40 and first.min() >= 0 and first.max() < 40
    assert len(first.unique()) < 40  # drawn with replacement: some images twice, some never
    second = ensemble.subset_indices(labels, {**spec, "member": 1})
    assert not torch.equal(first, second)
    assert not torch.equal(first, ensemble.subset_indices(labels, {**spec, "seed": 8}))
    # Over many members, each image is left out with probability (1 - 1/n)^n, about 37%.
    distinct = [len(ensemble.subset_indices(labels, {**spec, "member": m, "members": 50}).unique()) for m in range(50)]
    assert 0.55 < sum(distinct) / (50 * 40) < 0.71


def test_disjoint_parts_cover_the_training_set_once_and_keep_the_class_balance():
    labels = _labels(14, 9)
    parts = [ensemble.subset_indices(labels, {"kind": "disjoint", "member": m, "members": 3, "seed": 0})
             for m in range(3)]
    together = torch.cat(parts)
    assert sorted(together.tolist()) == list(range(23))  # disjoint and complete
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    dogs = [int(labels[part].sum()) for part in parts]
    assert max(dogs) - min(dogs) <= 1
    again = ensemble.subset_indices(labels, {"kind": "disjoint", "member": 1, "members": 3, "seed": 0})
    assert torch.equal(again, parts[1])
    other = ensemble.subset_indices(labels, {"kind": "disjoint", "member": 1, "members": 3, "seed": 1})
    assert not torch.equal(other, parts[1])


@pytest.mark.parametrize("spec", [
    {"kind": "jackknife", "member": 0, "members": 2},
    {"kind": "bootstrap", "member": 2, "members": 2},
    {"kind": "bootstrap", "member": 0, "members": 2, "size": 3},
    {"kind": "disjoint", "member": 0, "members": 50},
    "bootstrap",
])
def test_bad_subset_specs_are_user_errors(spec):
    with pytest.raises(UserError):
        ensemble.subset_indices(_labels(5, 5), spec)


def test_selected_images_stay_with_their_labels_under_a_key_of_their_own():
    labels = _labels(6, 6)
    images = torch.arange(12, dtype=torch.uint8).view(12, 1, 1, 1).expand(12, 3, 2, 2).contiguous()
    spec = {"kind": "bootstrap", "member": 1, "members": 2, "seed": 0}
    chosen, chosen_labels, key = ensemble.select_training_subset(images, labels, spec, "full")
    positions = chosen[:, 0, 0, 0].long()
    assert torch.equal(positions, ensemble.subset_indices(labels, spec))
    assert torch.equal(chosen_labels, labels[positions])
    other_key = ensemble.select_training_subset(images, labels, {**spec, "member": 0}, "full")[2]
    assert key != "full" and key != other_key


# --- voting -----------------------------------------------------------------------------------


def _binary(*dog_probabilities_per_member) -> torch.Tensor:
    """(K, N, 2) from each member's list of P(dog)."""
    p = torch.tensor(dog_probabilities_per_member, dtype=torch.float32)
    return torch.stack([1 - p, p], -1)


def test_soft_vote_averages_probabilities_and_hard_vote_counts_heads():
    probabilities = _binary([0.9, 0.6, 0.8],
                            [0.4, 0.6, 0.7],
                            [0.4, 0.1, 0.9])
    soft, mean = ensemble.soft_vote(probabilities)
    assert torch.allclose(mean[:, 1], torch.tensor([1.7 / 3, 1.3 / 3, 2.4 / 3]))
    assert soft.tolist() == [1, 0, 1]  # one confident member outweighs two hesitant ones
    assert ensemble.hard_vote(probabilities).tolist() == [0, 1, 1]  # majority of heads


def test_hard_vote_ties_go_to_the_soft_vote():
    probabilities = _binary([0.9, 0.7], [0.3, 0.1])  # two members, each image split 1-1
    assert ensemble.hard_vote(probabilities).tolist() == [1, 0]
    three_classes = torch.tensor([[[0.5, 0.4, 0.1]], [[0.1, 0.5, 0.4]], [[0.2, 0.2, 0.6]],
                                  [[0.1, 0.8, 0.1]]])  # votes: 0, 1, 2, 1
    assert ensemble.hard_vote(three_classes).tolist() == [1]
    assert ensemble.hard_vote(three_classes[:3]).tolist() == [1]  # 1-1-1: highest mean is class 1


def test_vote_metrics_on_hand_made_probabilities():
    labels = torch.tensor([1, 1, 0, 0])
    probabilities = _binary([0.9, 0.4, 0.2, 0.6],   # right on images 0 and 2
                            [0.8, 0.7, 0.3, 0.2],   # right on all four
                            [0.3, 0.8, 0.7, 0.1])   # right on images 1 and 3
    result = ensemble.vote_metrics(probabilities, labels, ["a", "b", "c"], resamples=400)
    assert [m["acc"] for m in result["members"]] == [0.5, 1.0, 0.5]
    assert result["members_mean_acc"] == pytest.approx(2 / 3)
    assert result["members_std_acc"] == pytest.approx(torch.tensor([0.5, 1.0, 0.5]).std().item())
    assert result["soft"]["acc"] == 1.0 and result["hard"]["acc"] == 1.0
    mean_true = torch.tensor([2.0 / 3, 1.9 / 3, 1 - 1.2 / 3, 1 - 0.9 / 3])
    assert result["soft"]["loss"] == pytest.approx(float(-mean_true.log().mean()), rel=1e-5)
    assert result["members"][0]["loss"] == pytest.approx(float(-torch.tensor([0.9, 0.4, 0.8, 0.4]).log().mean()), rel=1e-5)
    # a/b differ on 2 images, a/c on all 4, b/c on 2: (0.5 + 1 + 0.5) / 3
    assert result["disagreement"] == pytest.approx(2 / 3)
    boot = result["bootstrap"]
    assert boot["resamples"] == 400 and boot["members_std_acc"][1] == 0.0  # always right: no spread
    assert boot["members_std_acc"][0] > 0.15 and boot["soft_std_acc"] == 0.0
    assert result["confusion_soft"] == [[2, 0], [0, 2]]


# --- planning members -------------------------------------------------------------------------


def _recipe(*overrides) -> dict:
    pairs = [(overrides[i].lstrip("-"), overrides[i + 1]) for i in range(0, len(overrides), 2)]
    return recipes.apply_overrides(recipes.read_recipe("baseline"), pairs)


def test_members_vary_one_thing_each():
    config = _recipe("--seed", "5")
    by_seed = ensemble.plan_members(config, "seed", 3)
    assert [m.name for m in by_seed] == ["1-seed5", "2-seed6", "3-seed7"]
    assert [m.config["train"]["seed"] for m in by_seed] == [5, 6, 7]
    bagged = ensemble.plan_members(config, "data", 2, disjoint=True)
    assert [m.config["data"]["subset"] for m in bagged] == [
        {"kind": "disjoint", "member": i, "members": 2, "seed": 5} for i in range(2)]
    assert {m.config["train"]["seed"] for m in bagged} == {5}  # only the data differs
    models = ensemble.plan_members(config, "model", 3, models=["small-cnn", "deep-cnn"])
    assert [m.name for m in models] == ["1-small-cnn", "2-deep-cnn", "3-small-cnn-seed6"]
    assert [m.config["model"]["name"] for m in models] == ["small-cnn", "deep-cnn", "small-cnn"]


def test_optimizer_members_keep_a_fine_tune_stage_at_its_ratio():
    config = _recipe()
    config["stages"] = [{"name": "top", "epochs": 1, "lr": 1e-4, "optimizer": "rmsprop"},
                        {"name": "finetune", "epochs": 1, "lr": 1e-5}]
    planned = ensemble.plan_members(config, "optimizer",
                                    optimizers=ensemble.parse_optimizers("adamw:3e-4, sgd"))
    assert [m.name for m in planned] == ["1-adamw-0.0003", "2-sgd-0.0001"]
    stages = [recipes.stage_plan(m.config) for m in planned]
    assert [(s["optimizer"], s["lr"]) for s in stages[0]] == [("adamw", 3e-4), ("adamw", 3e-5)]
    assert [(s["optimizer"], s["lr"]) for s in stages[1]] == [("sgd", 1e-4), ("sgd", 1e-5)]


@pytest.mark.parametrize("call", [
    lambda c: ensemble.plan_members(c, "seed", 1),
    lambda c: ensemble.plan_members(c, "weather", 3),
    lambda c: ensemble.plan_members(c, "seed", 2, models=["small-cnn"]),
    lambda c: ensemble.plan_members(c, "model", 2),
    lambda c: ensemble.plan_members(c, "model", models=["small-cnn", "tiny-cnn"]),
    lambda c: ensemble.plan_members(c, "seed", 2, disjoint=True),
    lambda c: ensemble.plan_members(c, "optimizer", optimizers=ensemble.parse_optimizers("lion:1e-4")),
    lambda c: ensemble.parse_optimizers("adamw:fast"),
])
def test_bad_ensemble_requests_are_user_errors(call):
    with pytest.raises(UserError):
        call(_recipe())


def test_cores_are_shared_out_among_workers():
    assert ensemble.core_slots([0, 1, 2, 3, 4], 2) == [[0, 1, 2], [3, 4]]
    assert ensemble.core_slots([0, 1], 2) == [[0], [1]]
    assert ensemble.core_slots([0, 1], 3) == [[0], [1], [0]]


def test_recipe_overrides_are_not_taken_for_ensemble_options():
    args, extra = build_parser().parse_known_args(["ensemble", "baseline", "--vary", "seed", "--optimizer", "adamw",
                                                   "--model.dropout", "0.5"])
    assert args.optimizers is None and args.models is None
    assert extra == ["--optimizer", "adamw", "--model.dropout", "0.5"]


# --- training, resuming, evaluating, predicting -------------------------------------------------


@pytest.fixture(scope="module")
def trained_ensemble(tiny_split, tmp_path_factory):
    """Two members differing in their seed, trained at once in two worker processes."""
    folder = tmp_path_factory.mktemp("ensembles") / "seeds"
    code = main(["ensemble", "baseline", "--vary", "seed", "--members", "2", "--parallel", "2", "--data",
                 str(tiny_split), "--out", str(folder), *TINY])
    assert code == 0
    return folder


def test_an_ensemble_trains_its_members_into_run_folders(trained_ensemble):
    info = json.loads((trained_ensemble / "ensemble.json").read_text())
    assert [m["name"] for m in info["members"]] == ["1-seed0", "2-seed1"]
    assert info["vote"] == "soft" and set(info["votes"]) == {"soft", "hard"}
    for member in info["members"]:
        member_dir = trained_ensemble / member["dir"]
        for name in ("config.yaml", "model.safetensors", "checkpoint.pt", "metrics.json", "history.json"):
            assert (member_dir / name).is_file(), (member["name"], name)
    metrics = json.loads((trained_ensemble / "metrics.json").read_text())
    test = metrics["test"]
    assert test["images"] == 12 and len(test["members"]) == 2
    for member in test["members"]:
        stored = json.loads((trained_ensemble / "members" / member["name"] / "metrics.json").read_text())
        assert member["acc"] == pytest.approx(stored["test_acc"])  # the same model, the same images
    assert 0 <= test["soft"]["acc"] <= 1 and 0 <= test["hard"]["acc"] <= 1
    assert metrics["workers"] == 2 and set(metrics["member_seconds"]) == {"1-seed0", "2-seed1"}
    cores = len(os.sched_getaffinity(0))
    assert metrics["cores_per_worker"] == ([cores // 2 + cores % 2, cores // 2] if cores > 1 else [1, 1])
    for member in info["members"]:  # each worker wrote its own member's log
        assert "Epoch 1/1" in (trained_ensemble / member["dir"] / "log.txt").read_text()


def test_evaluate_on_an_ensemble_folder_reports_members_and_votes(capsys, trained_ensemble, tiny_split):
    code, out, _ = run_cli(capsys, "evaluate", trained_ensemble, "--data", tiny_split, "--json")
    assert code == 0
    for text in ("1-seed0", "2-seed1", "soft vote", "hard vote", "mean", "std", "bootstrap resamples"):
        assert text in out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["data"].endswith("test") and result["images"] == 12
    assert set(result["bootstrap"]) >= {"members_mean_std_acc", "soft_std_acc", "hard_std_acc"}


def test_predict_on_an_ensemble_folder_votes_and_writes_kaggle_csv(capsys, trained_ensemble, shared_data, tmp_path):
    folder = tmp_path / "unlabelled"
    folder.mkdir()
    for n in (3, 4, 11):
        shutil.copyfile(shared_data / "dogs-vs-cats" / "test1" / f"{n}.jpg", folder / f"{n}.jpg")
    code, out, _ = run_cli(capsys, "predict", trained_ensemble, folder, "--csv", tmp_path / "submission.csv")
    assert code == 0
    lines = [line.split("\t") for line in out.splitlines() if "\t" in line]
    assert len(lines) == 3
    for _, label, probability, votes in lines:
        assert label in ("cats", "dogs") and 0.5 <= float(probability) <= 1
        assert votes in ("1/2 members", "2/2 members")
    rows = list(csv.reader((tmp_path / "submission.csv").open()))
    assert [r[0] for r in rows[1:]] == ["3", "4", "11"]


def _snapshot(folder):
    return {path.name: (path.stat().st_mtime_ns, path.read_bytes()) for path in folder.iterdir() if path.is_file()}


def test_an_interrupted_ensemble_resumes_and_keeps_finished_members(capsys, tiny_split, tmp_path, monkeypatch):
    out_dir = tmp_path / "bagged"
    args = ["ensemble", "baseline", "--vary", "data", "--members", "2", "--parallel", "1", "--data", tiny_split,
            "--out", out_dir, *TINY, "--epochs", "2"]
    real_fit = run_module.fit

    def second_member_stops_after_one_epoch(*fit_args, **kwargs):
        def stop(state):
            if fit_args[6].name.startswith("2-") and state.epoch == 1:
                raise KeyboardInterrupt
        return real_fit(*fit_args, **kwargs, on_epoch=stop)

    monkeypatch.setattr(run_module, "fit", second_member_stops_after_one_epoch)
    code, out, _ = run_cli(capsys, *args)
    assert code == 130 and f"convtricks ensemble --resume {out_dir}" in out
    first, second = out_dir / "members" / "1-bootstrap", out_dir / "members" / "2-bootstrap"
    assert ensemble.member_status(first) == "finished" and ensemble.member_status(second) == "interrupted"
    kept = _snapshot(first)
    code, out, err = run_cli(capsys, "evaluate", out_dir)
    assert code == 2 and "has not finished" in err

    monkeypatch.setattr(run_module, "fit", real_fit)
    code, out, _ = run_cli(capsys, *args)  # the same command again continues the same folder
    assert code == 0, out
    assert "1-bootstrap already finished" in out and "Resuming 2-bootstrap after epoch 1" in out
    assert _snapshot(first) == kept
    assert [row["epoch"] for row in json.loads((second / "history.json").read_text())] == [1, 2]
    assert "soft vote" in out and (out_dir / "metrics.json").is_file()

    code, out, _ = run_cli(capsys, "ensemble", "--resume", out_dir)  # nothing left to train
    assert code == 0 and _snapshot(first) == kept
    code, _, err = run_cli(capsys, *args[:-2], "--epochs", "3")  # other settings, same folder
    assert code == 2 and "other settings" in err


def _feature_files() -> dict:
    folder = os.path.join(os.environ["CONVTRICKS_CACHE"], "features")
    if not os.path.isdir(folder):
        return {}
    return {name: os.stat(os.path.join(folder, name)).st_mtime_ns for name in os.listdir(folder)}


def test_members_with_a_frozen_base_share_features_computed_once(tiny_split, tmp_path, monkeypatch):
    """The parent runs the frozen base once, over the validation and the full training images;
    bagging members then index the full set's outputs with their own sample."""
    monkeypatch.setenv("CONVTRICKS_CACHE", str(tmp_path / "cache"))
    config = _recipe(*TINY, "--model.name", "efficientnet-lite0", "--trainable", "top.*", "--target_size", "32",
                     "--val_batch_size", "6")
    bagged = ensemble.create_ensemble(ensemble.plan_members(config, "data", 2), "data", tiny_split, tmp_path / "bagged")
    members = [path for _, path in ensemble.member_dirs(tmp_path / "bagged", bagged)]
    ensemble.warm_shared_caches(members)
    warmed = _feature_files()
    assert len(warmed) == 2  # validation and training images
    for member_dir in members:
        ensemble.train_member(member_dir)
    after = _feature_files()
    assert {name: after[name] for name in warmed} == warmed  # read by both members, not recomputed
    assert len(after) == 3  # plus the base's output on the test images, which the members also share
    histories = [json.loads((path / "history.json").read_text()) for path in members]
    assert histories[0][0]["loss"] != histories[1][0]["loss"]  # and yet each trained on its own sample

    optimizers = ensemble.plan_members(config, "optimizer", optimizers=ensemble.parse_optimizers("rmsprop,adam"))
    shared = ensemble.create_ensemble(optimizers, "optimizer", tiny_split, tmp_path / "optimizers")
    ensemble.warm_shared_caches([path for _, path in ensemble.member_dirs(tmp_path / "optimizers", shared)])
    assert len(_feature_files()) == 3  # the same cache serves every member

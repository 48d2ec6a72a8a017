"""Fine-tuning end to end on tiny configs: pre-train -> fine-tune -> evaluate.

One tiny pre-training run (synthetic data, r18x0.25, 16 px) is shared by the
module; the fine-tuning runs start from it.
"""

import importlib.util
import json
import os
import pathlib

import jax
import numpy as np
import pytest
import scipy.special
import tensorflow as tf
from flax import traverse_util
from sklearn import calibration as skc
from sklearn import metrics as skm

from micle_jax import checkpoint, config_lib, models, predict, recipes, rundir
from micle_jax.data import records, shards
from micle_jax.data.sources import synthetic
from micle_jax.data.stream import pipeline
from micle_jax.trainers import evaluate, finetune, pretrain, restore, train_state
from micle_jax.trainers import supervised_step as step_lib

SYNTHETIC = "synthetic:num_cases=48,num_classes=3,image_size=24,max_images_per_case=2"
MULTILABEL_CLASSES = ["edema", "effusion"]
REPO = pathlib.Path(__file__).resolve().parents[1]
RESULT_KEYS = {"eval", "metric", "value", "ci_low", "ci_high", "split", "dataset", "step"}


def write_multilabel_records(path, class_names, num_cases=24, seed=0, written=None):
    """A tiny multilabel record set: a class's positives brighten its own quadrant.

    Returns the dataset folder. Every 7th label is UNCERTAIN, every 11th MISSING.
    `written`, a dict, receives {image_id: label_multi [classes]} of the test split.
    """
    rng = np.random.default_rng(seed)
    c = len(class_names)
    info = records.DatasetInfo(
        name=os.path.basename(path), label_type="multilabel", class_names=class_names, splits={}
    )
    k = 0
    for split, n in (("train", num_cases), ("validation", num_cases // 2), ("test", num_cases)):
        examples, sizes = [], []
        for case in range(n):
            num_images = 1 + case % 2
            images, labels = [], []
            for _ in range(num_images):
                label = rng.integers(0, 2, c).astype(np.float32)
                image = rng.integers(0, 60, (20, 20, 3)).astype(np.uint8)
                for j in range(c):
                    if label[j]:
                        image[(j // 2) * 10 : (j // 2 + 1) * 10, (j % 2) * 10 :][:, :10] += 150
                    k += 1
                    if k % 7 == 0:
                        label[j] = records.UNCERTAIN
                    elif k % 11 == 0:
                        label[j] = records.MISSING
                images.append(tf.io.encode_png(image).numpy())
                labels.append(label)
            ids = [f"{split}-{case}-{i}" for i in range(num_images)]
            if written is not None and split == "test":
                written.update(zip(ids, labels, strict=True))
            example = records.make_case_example(
                f"{split}-patient{case}",
                images,
                ids,
                ["png"] * num_images,
                label_multi=np.stack(labels),
            )
            examples.append(example.SerializeToString())
            sizes.append(num_images)
        split_shards = shards.write_split(path, split, examples, num_shards=2)
        info.splits[split] = shards.make_split_info(split_shards, sizes)
    records.write_info(path, info)
    return path


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """Workdir of a 2-step tiny SimCLR pre-training run."""
    workdir = tmp_path_factory.mktemp("pretrain")
    config = recipes.pretrain_config("r18x0.25")
    recipes.runlocal_pretrain(config)
    config.total_steps = 2
    config.batch_size = 8
    config.checkpoint_every_steps = 2
    config.data.source = SYNTHETIC
    config.data.image_size = 16
    # Monitoring pre-training on frozen features (the pretrain trainer's evals hook).
    config.evals = dict(knn=dict(type="knn", every_steps=2, data=dict(split="test"), k=5))
    config.lock()
    pretrain.main(config, str(workdir))
    return str(workdir)


def scalar_tags(workdir):
    tags = set()
    for name in os.listdir(workdir):
        if name.startswith("events.out.tfevents"):
            for event in tf.compat.v1.train.summary_iterator(os.path.join(workdir, name)):
                tags.update(v.tag for v in event.summary.value)
    return tags


def finetune_config(source=SYNTHETIC, init="", steps=4, evals="classification", **overrides):
    config = recipes.finetune_config("r18x0.25")
    config.data.source = source
    config.data.image_size = 16
    config.data.cache_decoded = True
    config.evals.validation = dict(type=evals, data=dict(split="validation"), every_steps=2)
    config.evals.test = dict(type=evals, data=dict(split="test"))
    recipes.runlocal_finetune(config)
    config.total_steps = steps
    config.batch_size = 8
    config.eval_batch_size = 16
    config.bootstrap_samples = 50
    config.checkpoint_every_steps = 2
    config.select_best = f"validation/{'accuracy' if evals == 'classification' else 'auc_mean'}"
    config.init.checkpoint = init
    for key, value in overrides.items():
        parent = config
        *path, leaf = key.split(".")
        for part in path:
            parent = parent[part]
        parent[leaf] = value
    config.lock()
    return config


def read_results(workdir):
    with open(os.path.join(workdir, "results.json")) as f:
        return json.load(f)


def flat(tree):
    return traverse_util.flatten_dict(jax.tree.map(np.asarray, tree), sep="/")


def canonical(rows):
    """results.json rows as sorted JSON lines: comparable with NaN (a fitted value's CI)."""
    return sorted(json.dumps(r, sort_keys=True) for r in rows)


def sklearn_ece(logits, labels, temperature=1.0):
    """15-bin ECE of the top-1 confidence of softmax(logits / T): calibration_curve's bins,
    weighted by their images."""
    probs = scipy.special.softmax(np.asarray(logits, np.float64) / temperature, axis=1)
    confidence, correct = probs.max(1), (probs.argmax(1) == labels).astype(float)
    prob_true, prob_pred = skc.calibration_curve(correct, confidence, n_bins=15)
    counts = np.bincount(np.searchsorted(np.linspace(0, 1, 16)[1:-1], confidence), minlength=15)
    return np.sum(counts[counts > 0] / len(labels) * np.abs(prob_true - prob_pred))


def own_logits(workdir, data, split="test") -> dict[str, np.ndarray]:
    """{image_id: logits [classes]} of a run's final checkpoint on a split, without the
    evaluators: the pipeline's eval-mode images through model.apply, padding dropped."""
    return own_logits_of_splits(workdir, data, (split,))[split]


def own_logits_of_splits(workdir, data, splits) -> dict[str, dict[str, np.ndarray]]:
    """{split: own_logits of the split} for several splits, the checkpoint loaded once."""
    model, variables, _, _ = predict.load_run(workdir)
    variables = jax.device_get(variables)
    found = {}
    for split in splits:
        split_data = data.copy_and_resolve_references()
        with split_data.unlocked():
            split_data.split = split
        logits = found[split] = {}
        batches = pipeline.open_data(split_data, seed=0).dataset("eval", 16)
        for batch in batches.as_numpy_iterator():
            out = np.asarray(model.apply(variables, batch["image"], train=False)["logits"])
            for image_id, row, keep in zip(batch["image_id"], out, batch["mask"], strict=True):
                if keep:
                    logits[image_id.decode()] = row
    return found


def test_trainable_mask_freezes_stages_and_unused_projection_layers():
    model = models.build_model(config_lib.model_config("r18x0.25", num_classes=3))
    params = jax.eval_shape(
        lambda: model.init(jax.random.key(0), np.zeros((1, 16, 16, 3)), train=False)
    )["params"]
    full = traverse_util.flatten_dict(step_lib.trainable_mask(params, -1, 1), sep="/")
    assert all(v for k, v in full.items() if k.startswith(("backbone/", "head/")))
    assert all(
        full[k] for k in full if k.startswith(("projection_head/dense1", "projection_head/bn1"))
    )
    assert not any(full[k] for k in full if k.startswith("projection_head/dense2"))
    linear = traverse_util.flatten_dict(step_lib.trainable_mask(params, 4, 0), sep="/")
    assert {k for k, v in linear.items() if v} == {"head/dense/kernel", "head/dense/bias"}
    partial = traverse_util.flatten_dict(step_lib.trainable_mask(params, 2, 0), sep="/")
    assert not any(v for k, v in partial.items() if k.startswith("backbone/block_group2/"))
    assert all(v for k, v in partial.items() if k.startswith("backbone/block_group3/"))
    zeroed = step_lib.zero_head(jax.tree.map(lambda p: np.ones(p.shape, p.dtype), params))
    assert np.all(zeroed["head"]["dense"]["kernel"] == 0)


@pytest.mark.slow
def test_pretraining_logs_knn_accuracy_of_frozen_features(pretrained):
    assert {"knn/accuracy", "knn/per_class_accuracy/class_0"} <= scalar_tags(pretrained)


@pytest.mark.slow
def test_init_copies_backbone_and_first_projection_layer(pretrained):
    """SimCLR's ft_proj_selector=1: the weights restore.weight_prefixes names exist and copy."""
    loaded = checkpoint.load_variables(pretrained)
    model = models.build_model(config_lib.model_config("r18x0.25", num_classes=3))
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(1), np.zeros((1, 16, 16, 3)), train=False)
    )
    target = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), dict(shapes))
    prefixes = restore.weight_prefixes(recipes.finetune_config("r18x0.25").init)
    merged, copied = checkpoint.merge_variables(target, loaded, prefixes)
    assert any("projection_head/dense1" in c for c in copied)
    src, out = flat(loaded["params"]), flat(merged["params"])
    for name in out:
        if name.startswith(("backbone/", "projection_head/dense1", "projection_head/bn1")):
            np.testing.assert_array_equal(out[name], src[name])
        elif name.startswith(("projection_head/dense2", "head/")):
            assert not np.any(out[name]), name  # left to the fresh initialisation


@pytest.mark.slow
def test_linear_eval_multiclass_end_to_end(pretrained, tmp_path):
    """Pre-train -> linear eval (frozen backbone) on 50% of the cases -> results.json."""
    workdir = str(tmp_path / "linear")
    config = finetune_config(
        init=pretrained,
        **{
            "model.fine_tune_after_block": 4,
            "init.init_proj_layers": 0,
            "data.label_fraction": 0.5,
            "optim.name": "momentum",
            "optim.base_lr": 0.05,
        },
    )
    with config.unlocked():  # the clinical fields of configs/finetune_*.py (no metadata here)
        config.evals.test.update(
            fit_on="validation",
            calibration=True,
            operating_points=dict(specificity=(0.9,), sensitivity=(0.9,)),
        )
    final = finetune.main(config, workdir)
    # The test accuracy is sklearn's on the final model's own predictions and the
    # synthetic test labels (make_table, not the pipeline's).
    table = synthetic.make_table("test", 48, 3, 24, 2)
    labels = dict(zip(table.image_ids.astype(str), table.label_class, strict=True))
    own = own_logits_of_splits(workdir, config.data, ("test", "validation"))
    logits = own["test"]
    assert sorted(logits) == sorted(labels)
    ids = sorted(labels)
    predicted = [int(np.argmax(logits[i])) for i in ids]
    want = skm.accuracy_score([labels[i] for i in ids], predicted)
    assert final["test/accuracy"] == pytest.approx(want, abs=1e-6)
    # Learned: the zero-initialised head scores every class alike (AUC 0.5); 4 steps
    # on the colour-coded classes rank them almost perfectly (measured 1.0 test,
    # 0.996 validation), while the accuracy, still calibrating, is only ~0.47.
    assert final["test/auc_mean"] >= 0.9, final
    status = rundir.read_status(workdir)
    assert status["status"] == "finished" and status["step"] == 4

    # The frozen backbone (weights and BatchNorm statistics) is the pre-trained one.
    before = checkpoint.load_variables(pretrained)
    after = checkpoint.load_variables(workdir)
    for collection in ("params", "batch_stats"):
        src, out = flat(before[collection]), flat(after[collection])
        for name in (n for n in out if n.startswith("backbone/")):
            np.testing.assert_array_equal(out[name], src[name], err_msg=name)
    assert not np.allclose(flat(after["params"])["head/dense/kernel"], 0)

    # Label fraction: whole cases, reproducible, written to the workdir.
    kept = rundir.read_cases(workdir)
    assert kept == pipeline.open_data(config.data, seed=config.seed).label_fraction_cases()
    assert len(kept) == pytest.approx(48 * 0.5, abs=3)

    # results.json: the agreed format, final and best checkpoints, intervals.
    results = read_results(workdir)
    assert results["workdir"] == workdir and results["config"]["data"]["label_fraction"] == 0.5
    rows = results["results"]
    assert {r["checkpoint"] for r in rows} == {"final", "best"}
    for row in rows:
        if row["eval"] == "train":  # the first logged training loss: one number, no interval
            assert row["metric"] == "first_logged_loss" and "ci_low" not in row, row
            continue
        assert RESULT_KEYS <= set(row)
        if not {"calibration", "target"} & set(row):  # (an ECE's interval can sit above it)
            assert row["ci_low"] <= row["value"] <= row["ci_high"], row
    test_final = {
        r["metric"]: r
        for r in rows
        if r["eval"] == "test"
        and r["checkpoint"] == "final"
        and "calibration" not in r
        and "target" not in r
    }
    assert test_final["accuracy"]["split"] == "test" and test_final["accuracy"]["step"] == 4
    assert {"accuracy", "per_class_accuracy/class_0"} <= set(test_final)
    matrix = np.array(results["artifacts"]["test/final"]["confusion_matrix"])
    test_data = config.data.copy_and_resolve_references()
    test_data.split = "test"
    num_test = pipeline.open_data(test_data, seed=0).num_examples("eval")
    assert matrix.shape == (3, 3) and matrix.sum() == num_test
    assert os.path.isdir(rundir.best_dir(workdir))

    # The test eval's clinical rows, from the final model's own logits by scikit-learn: the
    # temperature minimises the validation NLL, the test ECE after it is calibration_curve's,
    # each threshold is the validation ROC point of its target.
    val_table = synthetic.make_table("validation", 48, 3, 24, 2)
    val_labels = dict(zip(val_table.image_ids.astype(str), val_table.label_class, strict=True))
    val_logits = own["validation"]
    val_ids = sorted(val_labels)
    val_x = np.array([val_logits[i] for i in val_ids], np.float64)
    val_y = np.array([val_labels[i] for i in val_ids])
    test_x = np.array([logits[i] for i in ids], np.float64)
    test_y = np.array([labels[i] for i in ids])
    clinical = {
        (r["metric"], r.get("calibration"), r.get("target")): r
        for r in rows
        if r["eval"] == "test" and r["checkpoint"] == "final"
    }
    temperature = clinical[("temperature", "after_temperature", None)]["value"]

    def nll(t):
        logp = scipy.special.log_softmax(val_x / t, axis=1)
        return -np.mean(logp[np.arange(len(val_y)), val_y])

    assert nll(temperature) <= min(nll(t) for t in np.geomspace(0.05, 20, 2001)) + 1e-6
    for tag, t in (("before_temperature", 1.0), ("after_temperature", temperature)):
        ece = clinical[("ece", tag, None)]["value"]
        assert ece == pytest.approx(sklearn_ece(test_x, test_y, t), abs=1e-5), tag
    val_probs = scipy.special.softmax(val_x, axis=1)
    test_probs = scipy.special.softmax(test_x, axis=1)
    for c in range(3):
        fpr, tpr, thresholds = skm.roc_curve(val_y == c, val_probs[:, c], drop_intermediate=False)
        ok = np.flatnonzero(1 - fpr >= 0.9 - 1e-12)  # the most sensitive, then most specific
        at_spec = thresholds[ok[np.lexsort((fpr[ok], -tpr[ok]))[0]]]
        ok = np.flatnonzero(tpr >= 0.9 - 1e-12)  # the most specific, then most sensitive
        at_sens = thresholds[ok[np.lexsort((-tpr[ok], fpr[ok]))[0]]]
        for target, want in (("specificity=0.9", at_spec), ("sensitivity=0.9", at_sens)):
            got = clinical[(f"threshold/class_{c}", None, target)]
            assert got["value"] == pytest.approx(want, rel=1e-5) and got["fit_on"] == "validation"
            predicted = test_probs[:, c] >= got["value"]
            sensitivity = clinical[(f"sensitivity/class_{c}", None, target)]["value"]
            assert sensitivity == pytest.approx(skm.recall_score(test_y == c, predicted))
    plots = {"reliability_test_best.png", "reliability_test_final.png"}
    assert set(os.listdir(os.path.join(workdir, "plots"))) == plots

    # Rerunning a finished run resumes at its last step, keeps its best
    # checkpoint (read back from WORKDIR/best) and writes the same results.
    assert finetune.main(config, workdir) == final
    assert canonical(read_results(workdir)["results"]) == canonical(rows)

    # --mode=eval on the final checkpoint reproduces the run's final numbers.
    eval_dir = str(tmp_path / "eval_final")
    evaluate.evaluate_checkpoint(config, eval_dir, workdir)
    again = read_results(eval_dir)["results"]
    # (Evaluation alone has no training loss: the 'train' row is the run's.)
    expected = [r for r in rows if r["checkpoint"] == "final" and r["eval"] != "train"]
    assert canonical(again) == canonical(expected)
    assert os.listdir(os.path.join(eval_dir, "plots")) == ["reliability_test_final.png"]
    # ... and on the best checkpoint, the run's best numbers.
    best_dir = str(tmp_path / "eval_best")
    evaluate.evaluate_checkpoint(config, best_dir, rundir.best_dir(workdir))
    again = read_results(best_dir)["results"]
    expected = [r for r in rows if r["checkpoint"] == "best"]
    assert canonical(again) == canonical(expected)

    # Nothing is overwritten: evaluating into a workdir with results is an error.
    before_bytes = open(os.path.join(eval_dir, "results.json"), "rb").read()
    with pytest.raises(ValueError, match="already exists"):
        evaluate.evaluate_checkpoint(config, eval_dir, workdir)
    assert open(os.path.join(eval_dir, "results.json"), "rb").read() == before_bytes

    # A checkpoint whose head does not match the config's classes.
    other = finetune_config(source=SYNTHETIC.replace("num_classes=3", "num_classes=4"))
    with pytest.raises(ValueError, match="head differs"):
        evaluate.evaluate_checkpoint(other, str(tmp_path / "bad_head"), workdir)
    wider = finetune_config(**{"model.width": 0.5})
    with pytest.raises(ValueError, match="backbone differs"):
        evaluate.evaluate_checkpoint(wider, str(tmp_path / "bad_backbone"), workdir)
    assert not os.path.exists(tmp_path / "bad_head" / "results.json")


@pytest.mark.slow
def test_full_finetune_multilabel_with_shift_end_to_end(pretrained, tmp_path):
    """Pre-train -> full fine-tuning (multilabel, from projection layer 1) -> AUCs + shift."""
    written = {}
    cxr = write_multilabel_records(str(tmp_path / "cxr"), MULTILABEL_CLASSES, written=written)
    # A shifted dataset with its own label names: one maps onto each model class,
    # one is left out.
    nih = write_multilabel_records(
        str(tmp_path / "nih"), ["Effusion", "Hernia", "Edema"], num_cases=16, seed=1
    )
    config = finetune_config(
        source=f"records:{cxr}",
        init=pretrained,
        evals="multilabel",
        **{"data.uncertain_policy": "ones", "data.augment": "cxr"},
    )
    with config.unlocked():
        config.evals.shift_nih = dict(
            type="multilabel",
            data=dict(source=f"records:{nih}", split="test"),
            label_map={"Effusion": "effusion", "Hernia": "", "Edema": "edema"},
        )
    workdir = str(tmp_path / "ft")
    final = finetune.main(config, workdir)
    # The test AUCs are sklearn's on the final model's own logits and the labels as
    # written: uncertain ones ignored (the evals' policy, whatever training used),
    # missing ones negative.
    logits = own_logits(workdir, config.data)
    assert sorted(logits) == sorted(written)
    ids = sorted(written)
    scores = np.array([logits[i] for i in ids])
    values = np.array([written[i] for i in ids])
    aucs = []
    for c, name in enumerate(MULTILABEL_CLASSES):
        known = values[:, c] != records.UNCERTAIN
        aucs.append(skm.roc_auc_score(values[known, c] == 1.0, scores[known, c]))
        assert final[f"test/auc/{name}"] == pytest.approx(aucs[-1], abs=1e-6), name
    assert final["test/auc_mean"] == pytest.approx(np.mean(aucs), abs=1e-6)
    rows = read_results(workdir)["results"]
    shift = {r["metric"]: r for r in rows if r["eval"] == "shift_nih" and r["checkpoint"] == "best"}
    assert set(shift) <= {"auc/edema", "auc/effusion", "auc_mean"} and "auc_mean" in shift
    assert shift["auc_mean"]["dataset"] == "nih" and shift["auc_mean"]["split"] == "test"
    test = {r["metric"]: r["value"] for r in rows if r["eval"] == "test"}
    assert np.isclose(test["auc_mean"], np.mean([test["auc/edema"], test["auc/effusion"]]))
    task = json.load(open(os.path.join(workdir, "task_info.json")))
    assert task["label_type"] == "multilabel" and task["class_names"] == MULTILABEL_CLASSES


def test_bad_input_stops_before_writing(tmp_path, pretrained):
    workdir = tmp_path / "never"
    mismatch = finetune_config(**{"model.num_classes": 5})
    with pytest.raises(ValueError, match="num_classes=5 but .* 3 classes"):
        finetune.main(mismatch, str(workdir))
    wrong_type = finetune_config(evals="multilabel")
    with pytest.raises(ValueError, match="use type classification"):
        finetune.main(wrong_type, str(workdir))
    other_classes = finetune_config()
    with other_classes.unlocked():
        other_classes.evals.test.data.source = SYNTHETIC.replace("num_classes=3", "num_classes=4")
    with pytest.raises(ValueError, match="differ from the model's"):
        finetune.main(other_classes, str(workdir))
    bad_select = finetune_config(select_best="nope/accuracy")
    with pytest.raises(ValueError, match="'nope'"):
        finetune.main(bad_select, str(workdir))
    unlabelled = finetune_config(source=f"records:{REPO / 'data/demo/hannover_cxr'}")
    with pytest.raises(ValueError, match="needs labels"):
        finetune.main(unlabelled, str(workdir))
    assert not workdir.exists()


def test_empty_evaluation_split_is_an_error(tmp_path):
    path = write_multilabel_records(str(tmp_path / "cxr"), MULTILABEL_CLASSES, num_cases=4)
    # Rewrite the test split with no case at all.
    info = records.load_info(path)
    for name in os.listdir(path):
        if name.startswith("test-"):
            os.remove(os.path.join(path, name))
    info.splits["test"] = shards.make_split_info(shards.write_split(path, "test", [], 1), [])
    records.write_info(path, info)
    config = finetune_config(source=f"records:{path}", evals="multilabel")
    with pytest.raises(ValueError, match="test"):
        finetune.main(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def load_config(path, arg):
    spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg)
    config.lock()
    return config


@pytest.mark.parametrize(
    "path,arg",
    [
        ("configs/finetune_derm.py", "arch=r50x4,label_fraction=0.2,shifted_eval=True"),
        ("configs/finetune_derm.py", "runlocal=True"),
        ("configs/finetune_chexpert.py", "arch=r152x2,shifted_eval=True,uncertain=ones"),
        ("configs/finetune_chexpert.py", "runlocal=True,shifted_eval=True"),
        ("configs/linear_eval.py", "task=chexpert,init=/runs/micle"),
        ("configs/linear_eval.py", "task=derm,runlocal=True"),
        ("configs/supervised_imagenet.py", "arch=r50x1"),
        ("configs/supervised_imagenet.py", "runlocal=True"),
    ],
)
def test_configs_build_with_the_published_values(path, arg):
    config = load_config(path, arg)
    assert config.trainer == "finetune" and config.data.mode == "supervised"
    finetune.check_config(config)  # select_best names a periodic eval, batch splits
    runlocal = "runlocal" in arg
    if "linear_eval" in path:  # SimCLR's linear evaluation
        assert config.model.fine_tune_after_block == 4 and config.model.head_input == 0
        assert (config.optim.name, config.optim.base_lr) == ("momentum", 0.1)
        assert runlocal or config.batch_size == 4096
    elif "supervised" in path:
        assert config.model.proj_layers == 0 and config.model.head_input == 0
    else:  # SimCLR v2's fine-tuning from projection layer 1
        assert config.model.head_input == config.init.init_proj_layers == 1
        assert (config.optim.name, config.optim.base_lr, config.optim.lr_scaling) == (
            "lars",
            0.005,
            "sqrt",
        )
        assert runlocal or (config.batch_size, config.total_epochs) == (1024, 60.0)
    if "label_fraction=0.2" in arg:
        assert config.data.label_fraction == 0.2
    if "chexpert" in path and runlocal:  # synthetic multilabel stand-in for CheXpert
        info = pipeline.open_data(config.data, seed=config.seed).info
        assert (info.label_type, info.num_classes) == ("multilabel", 5)
    if "shifted_eval" in arg:
        shift = [n for n in config.evals if n.startswith("shift")]
        assert len(shift) == 1
        if "chexpert" in path and not runlocal:
            label_map = config.evals[shift[0]].label_map
            assert sorted(v for v in label_map.values() if v) == sorted(
                ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
            )
    with pytest.raises(AttributeError):
        config.evals.test.misspelled_field = 1  # locked: no silent additions


def test_linear_eval_needs_a_pretrained_init():
    with pytest.raises(ValueError, match="init=WORKDIR"):
        load_config("configs/linear_eval.py", "task=derm")


def _inflate_projection_layer1(pretrained, out_dir, factor):
    """A copy of `pretrained` with projection layer 1's BatchNorm scale and offset x factor.

    Pre-training cannot tell the two apart (layer 2's BatchNorm removes the
    scale), and its running statistics are rescaled to match, so this is the
    state a long pre-training with raw BatchNorm steps drifts to.
    """
    variables = checkpoint.load_variables(pretrained)
    bn1 = variables["params"]["projection_head"]["bn1"]
    variables["params"]["projection_head"]["bn1"] = {k: v * factor for k, v in bn1.items()}
    bn2 = variables["batch_stats"]["projection_head"]["bn2"]
    variables["batch_stats"]["projection_head"]["bn2"] = {
        "mean": bn2["mean"] * factor,
        "var": bn2["var"] * factor**2,
    }
    manager = checkpoint.make_manager(str(out_dir), 1, async_save=False)
    checkpoint.save(manager, 2, variables, {"step": 2})
    manager.close()
    return str(out_dir)


def test_head_input_normalisation_keeps_the_pretrained_function(pretrained, tmp_path):
    """Finding 1: rescaling projection layer 1 is invisible to the contrastive objective.

    The inflated copy and the original give the same NT-Xent loss in training
    mode and the same projections in inference mode; `normalize_head_input`
    brings the inflated copy back to unit BatchNorm scale without changing
    its projections either.
    """
    from micle_jax import losses

    inflated = _inflate_projection_layer1(pretrained, tmp_path / "inflated", 30.0)
    model = models.build_model(config_lib.model_config("r18x0.25"))
    original = checkpoint.load_variables(pretrained)
    big = checkpoint.load_variables(inflated)
    fixed, factor = restore.normalize_head_input(big, head_input=1)
    images = np.random.default_rng(0).uniform(size=(16, 16, 16, 3)).astype(np.float32)

    def contrastive_loss(variables):
        out, _ = model.apply(variables, images, train=True, mutable=["batch_stats"])
        z1, z2 = np.split(np.asarray(out["projections"]), 2)
        return float(losses.nt_xent(z1, z2, 0.1))

    def projections(variables):
        return np.asarray(model.apply(variables, images, train=False)["projections"])

    def head_input_rms(variables):
        scale = np.asarray(variables["params"]["projection_head"]["bn1"]["scale"])
        return float(np.sqrt(np.mean(scale**2)))

    # Equal up to BatchNorm epsilon (1e-5 against a variance 900x larger).
    assert contrastive_loss(big) == pytest.approx(contrastive_loss(original), rel=1e-3)
    np.testing.assert_allclose(projections(fixed), projections(original), rtol=2e-3, atol=2e-4)
    assert head_input_rms(big) > 20 * head_input_rms(original)
    assert head_input_rms(fixed) == pytest.approx(1.0, rel=1e-5)
    assert factor == pytest.approx(1.0 / head_input_rms(big), rel=1e-5)


@pytest.mark.slow
def test_finetuning_from_an_inflated_pretraining_starts_no_worse_than_scratch(pretrained, tmp_path):
    """Finding 1: the first logged training loss from a pre-trained run is not above scratch's.

    The checkpoint's projection layer 1 is 30x larger than the original
    (the drift of raw BatchNorm steps under LARS); by default fine-tuning
    normalises it back. Without that (normalize_head_input=False) the
    zero-initialised head overshoots: its first logged loss is above scratch's.
    """
    inflated = _inflate_projection_layer1(pretrained, tmp_path / "inflated", 30.0)

    def first_loss(name, **overrides):
        config = finetune_config(steps=6, **{"log_every_steps": 3, **overrides})
        finetune.main(config, str(tmp_path / name))
        rows = read_results(str(tmp_path / name))["results"]
        (row,) = [r for r in rows if r["metric"] == "first_logged_loss"]
        assert row["step"] == config.log_every_steps and row["protocol"] == "finetune"
        return row["value"]

    scratch = first_loss("scratch")
    normalised = first_loss("normalised", **{"init.checkpoint": inflated})
    raw = first_loss("raw", **{"init.checkpoint": inflated, "init.normalize_head_input": False})
    assert normalised <= scratch * 1.05, (normalised, scratch)
    assert raw > 2 * scratch, (raw, scratch)


def test_balanced_class_weights_match_sklearn_and_weight_the_loss():
    """class_weight='balanced': sklearn's weights; the step's loss is their weighted mean."""
    from sklearn.utils.class_weight import compute_class_weight

    labels = np.array([0] * 12 + [1] * 3 + [3] * 1)  # class 2 absent
    counts = np.bincount(labels, minlength=4)
    weights = step_lib.balanced_class_weights(counts)
    expected = compute_class_weight("balanced", classes=np.array([0, 1, 3]), y=labels)
    np.testing.assert_allclose(weights[[0, 1, 3]], expected, rtol=1e-6)
    assert weights[2] == 0.0
    with pytest.raises(ValueError, match="at least one labelled"):
        step_lib.balanced_class_weights(np.zeros(3))

    # The train step's loss is sum_i w[y_i] * CE_i / sum_i w[y_i] (label -1 left out).
    config = config_lib.model_config("r18x0.25", num_classes=4, head_stop_gradient=False)
    model = models.build_model(config)
    images = np.random.default_rng(1).uniform(size=(8, 16, 16, 3)).astype(np.float32)
    batch = {"image": images, "label": np.array([0, 0, 0, 1, 3, 1, -1, 0], np.int32)}
    variables = model.init(jax.random.key(0), images, train=False)
    import optax

    tx = optax.sgd(0.0)
    state = train_state.TrainState(
        step=jax.numpy.zeros((), jax.numpy.int32),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=tx.init(variables["params"]),
    )
    step = step_lib.make_train_step(model, tx, lambda s: 0.0, "multiclass", weights)
    _, measured = jax.jit(step)(state, batch)
    out, _ = model.apply(variables, images, train=True, mutable=["batch_stats"])
    logits = np.asarray(out["logits"], np.float64)
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    keep = batch["label"] >= 0
    ce = -log_probs[np.arange(8), np.maximum(batch["label"], 0)]
    w = weights[np.maximum(batch["label"], 0)] * keep
    assert float(measured["loss"]) == pytest.approx(float((w * ce).sum() / w.sum()), rel=1e-5)


def test_class_counts_follow_the_label_fraction():
    """Data.class_counts counts the labelled images of the kept cases (a second count)."""
    config = finetune_config(**{"data.label_fraction": 0.5})
    data = pipeline.open_data(config.data, seed=3)
    counts = data.class_counts()
    assert counts.shape == (3,) and counts.min() > 0
    assert counts.sum() == data.num_examples("supervised")
    full = finetune_config()
    assert pipeline.open_data(full.data, seed=3).class_counts().sum() > counts.sum()

"""Tests of micle_jax/data/stream/pipeline.py: determinism, exact resume, shares, pairs, padding."""

import itertools

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
from fixtures import tiny_records

from micle_jax import recipes
from micle_jax.data import records
from micle_jax.data.convert import inputs, write
from micle_jax.data.sources import in_memory, interface, registry
from micle_jax.data.stream import epochs, examples, pipeline

# Cheap to trace but random (crop position, flip), so seeds matter in every test.
AUGMENT = [("random_resized_crop", dict(area_range=(0.3, 1.0))), "flip_left_right"]
SYNTHETIC = "synthetic:num_cases=10,num_classes=3,image_size=12,max_images_per_case=3"


def data_config(source=SYNTHETIC, **overrides):
    fields = dict(source=source, image_size=8, augment=AUGMENT, shuffle_buffer=16)
    fields.update(overrides)
    return ml_collections.ConfigDict(fields)


def take(cfg, num_batches, *, mode, global_batch_size, seed, **kwargs):
    ds = pipeline.open_data(cfg, seed=seed).dataset(mode, global_batch_size, **kwargs)
    return list(itertools.islice(ds.as_numpy_iterator(), num_batches))


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


@pytest.fixture(scope="module")
def table():
    return registry.get_source(SYNTHETIC).table("train", interface.Share())


@pytest.fixture(scope="module")
def record_set(tmp_path_factory):
    path = tmp_path_factory.mktemp("records")
    return tiny_records.write(path, tiny_records.make_cases([1, 2, 3, 1, 2, 3, 2]), num_shards=2)


def test_simclr_batch_structure_and_resume_in_memory(table):
    n = table.num_images  # epochs of n images; batch 4 crosses epoch boundaries
    cfg = data_config()
    steps = 2 * n // 4 + 1
    run = take(cfg, steps, mode="simclr", global_batch_size=4, seed=3)
    resumed = take(cfg, steps - 5, mode="simclr", global_batch_size=4, seed=3, start_step=5)
    assert_same_batches(resumed, run[5:])
    b = run[0]
    assert b["view1"].shape == b["view2"].shape == (4, 8, 8, 3)
    assert b["view1"].dtype == np.float32 and 0.0 <= b["view1"].min() <= b["view1"].max() <= 1.0
    assert b["label"].dtype == np.int32 and not b["multi_instance"].any()
    np.testing.assert_array_equal(b["image_id1"], b["image_id2"])
    # Two views of one image differ (independent augmentation seeds).
    assert not np.allclose(b["view1"], b["view2"])
    # Each epoch is a permutation of all images; consecutive epochs differ in order.
    ids = np.concatenate([x["image_id1"] for x in run])
    assert sorted(ids[:n]) == sorted(table.image_ids)
    assert sorted(ids[n : 2 * n]) == sorted(table.image_ids)
    assert list(ids[:n]) != list(ids[n : 2 * n])
    other_seed = take(cfg, 1, mode="simclr", global_batch_size=4, seed=4)
    assert not np.array_equal(other_seed[0]["view1"], run[0]["view1"])


def test_micle_resume_streamed_records(record_set):
    cfg = data_config(record_set)
    run = take(cfg, 8, mode="micle", global_batch_size=2, seed=0)
    resumed = take(cfg, 3, mode="micle", global_batch_size=2, seed=0, start_step=5)
    assert_same_batches(resumed, run[5:8])
    # 7 cases: every case once per epoch, whatever the file order.
    cases = np.concatenate([b["case_id"] for b in run])
    assert sorted(cases[:7]) == [f"case{i:03d}".encode() for i in range(7)]
    assert sorted(cases[7:14]) == sorted(cases[:7])


def check_pairs(batches, case_sizes):
    """MICLe pairs: same case, different images iff the case has several."""
    seen = set()
    for b in batches:
        for case, id1, id2, multi in zip(
            b["case_id"], b["image_id1"], b["image_id2"], b["multi_instance"], strict=True
        ):
            assert id1.startswith(case + b"/") and id2.startswith(case + b"/")
            assert multi == (case_sizes[case] >= 2)
            assert (id1 != id2) == (case_sizes[case] >= 2)
            seen.add((id1, id2))
    return seen


def test_micle_pairs_in_memory(table):
    sizes = dict(zip(table.case_ids, table.case_size, strict=True))
    run = take(data_config(), 40, mode="micle", global_batch_size=5, seed=1)
    seen = check_pairs(run, sizes)
    # Random, not fixed: a 3-image case shows several of its 6 ordered pairs.
    big = next(c for c, n in sizes.items() if n == 3)
    assert len({p for p in seen if p[0].startswith(big + b"/")}) >= 4
    fraction = np.mean([b["multi_instance"].mean() for b in run])
    expected = np.mean([n >= 2 for n in sizes.values()])
    assert abs(fraction - expected) < 1e-6  # 40 batches of 5 = 20 whole epochs of 10 cases


def test_micle_pairs_from_records_cached_and_streamed(record_set):
    path = record_set.partition(":")[2]
    sizes = {f"case{i:03d}".encode(): n for i, n in enumerate([1, 2, 3, 1, 2, 3, 2])}
    for cache in (False, True):
        cfg = data_config(record_set, cache_decoded=cache)
        check_pairs(take(cfg, 7, mode="micle", global_batch_size=2, seed=0), sizes)
    data = pipeline.open_data(data_config(record_set), seed=0)
    assert data.num_examples("micle") == 7
    assert data.num_examples("simclr") == 14
    assert data.info.class_names == ["a", "b"]
    assert records.load_info(path).splits["train"]["num_images"] == 14


def test_pick_two_is_uniform_over_ordered_pairs_of_different_images():
    import tensorflow as tf

    seeds = tf.data.Dataset.range(1200).map(lambda i: tf.stack([i, tf.constant(9, tf.int64)]))
    for n in (1, 2, 3, 5):
        got = np.array(
            list(seeds.map(lambda s, n=n: tf.stack(examples.pick_two(tf.constant(n), s))))
        )
        if n == 1:
            assert (got == 0).all()  # SimCLR fallback: two views of the one image
            continue
        assert (got[:, 0] != got[:, 1]).all() and got.min() >= 0 and got.max() < n
        counts = np.zeros((n, n))
        np.add.at(counts, (got[:, 0], got[:, 1]), 1)
        expected = len(got) / (n * (n - 1))
        off_diagonal = counts[~np.eye(n, dtype=bool)]
        # 4 binomial standard deviations per ordered pair.
        assert np.abs(off_diagonal - expected).max() < 4 * np.sqrt(expected)


@pytest.mark.parametrize("num_shards", [1, 3])
def test_streamed_process_shares_are_disjoint_and_cover_an_epoch(tmp_path, num_shards):
    """Streamed records: by element (1 shard < 2 processes) and by file (3 shards)."""
    source = tiny_records.write(tmp_path, tiny_records.make_cases([2, 1, 3, 1, 2]), num_shards)
    cfg = data_config(source, cache_decoded=False)
    seen = []
    for index in range(2):
        n = epochs.num_units(
            registry.get_source(source).counts("train", interface.Share(index, 2)), "simclr"
        )
        run = take(
            cfg, n, mode="simclr", global_batch_size=2, seed=0, process_index=index, process_count=2
        )
        seen.append([i for b in run for i in b["image_id1"]])
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(
        f"case{c:03d}/img{j}".encode() for c, n in enumerate([2, 1, 3, 1, 2]) for j in range(n)
    )


@pytest.mark.parametrize("mode", ["simclr", "micle"])
def test_in_memory_streams_are_the_same_on_any_process_count(tmp_path, mode):
    """1, 2 and 4 processes read the same global batches: ids, labels and augmented pixels.

    Also: no example twice in an epoch across processes, and a stream started at
    step 1 on 2 processes continues the 1-process stream (a checkpoint resumes
    on another topology at the same position).
    """
    source = tiny_records.write(tmp_path, tiny_records.make_cases([2, 1, 3, 1, 2, 2, 1, 3]), 3)
    cfg = data_config(source, cache_decoded=True)
    steps, batch = 3, 4
    one = take(cfg, steps, mode=mode, global_batch_size=batch, seed=0)
    for count in (2, 4):
        per_process = [
            take(
                cfg,
                steps,
                mode=mode,
                global_batch_size=batch,
                seed=0,
                process_index=i,
                process_count=count,
            )
            for i in range(count)
        ]
        joined = [
            {k: np.concatenate([p[step][k] for p in per_process]) for k in one[step]}
            for step in range(steps)
        ]
        assert_same_batches(one, joined)
    units = "case_id" if mode == "micle" else "image_id1"
    epoch = [u for b in one[:2] for u in b[units]]  # 8 of the 8 cases / 15 images
    assert len(set(epoch)) == len(epoch) == 8
    resumed = [
        take(
            cfg,
            2,
            mode=mode,
            global_batch_size=batch,
            seed=0,
            start_step=1,
            process_index=i,
            process_count=2,
        )
        for i in range(2)
    ]
    for step in range(2):
        joined = {k: np.concatenate([p[step][k] for p in resumed]) for k in one[step + 1]}
        assert_same_batches([one[step + 1]], [joined])


def test_in_memory_shares_by_case(table):
    seen = []
    for index in range(2):
        run = take(
            data_config(),
            5,
            mode="micle",
            global_batch_size=2,
            seed=0,
            process_index=index,
            process_count=2,
        )
        seen.append([c for b in run for c in b["case_id"]])
    assert sorted(seen[0] + seen[1]) == sorted(table.case_ids)


def test_eval_padding_covers_each_image_once(table):
    n = table.num_images
    data = pipeline.open_data(data_config(), seed=0)
    batches = list(data.dataset("eval", 4).as_numpy_iterator())
    assert len(batches) == -(-n // 4)
    mask = np.concatenate([b["mask"] for b in batches])
    ids = np.concatenate([b["image_id"] for b in batches])
    assert mask.sum() == n and (mask[:n] == 1).all()
    assert list(ids[mask == 1]) == list(table.image_ids)  # the table's fixed order
    assert (np.concatenate([b["image"] for b in batches])[mask == 0] == 0).all()
    # Two processes: the same number of batches, together every image once.
    per_process = [
        list(data.dataset("eval", 4, process_index=i, process_count=2).as_numpy_iterator())
        for i in range(2)
    ]
    assert len(per_process[0]) == len(per_process[1])
    real = [
        i
        for p in per_process
        for b in p
        for i, m in zip(b["image_id"], b["mask"], strict=True)
        if m
    ]
    assert sorted(real) == sorted(table.image_ids)


def test_supervised_multiclass_skips_unlabelled_images():
    images = np.arange(6 * 9 * 9, dtype=np.uint8).reshape(6, 9, 9)
    labels = np.array([0, -1, 1, 2, -1, 1])
    cfg = data_config(in_memory.from_arrays(images, labels), augment="none")
    assert pipeline.open_data(cfg, seed=0).num_examples("supervised") == 4
    run = take(cfg, 4, mode="supervised", global_batch_size=2, seed=0)
    got = np.concatenate([b["label"] for b in run])
    assert sorted(got[:4]) == [0, 1, 1, 2] and got.dtype == np.int32
    assert run[0]["image"].shape == (2, 8, 8, 3) and "label_mask" not in run[0]


@pytest.mark.parametrize("policy", ["ignore", "zeros", "ones"])
def test_supervised_multilabel_uncertain_policy(policy):
    u, m = records.UNCERTAIN, records.MISSING
    multi = np.array([[1, 0, u, m], [u, u, 1, 0], [m, 1, 0, u]], np.float32)
    images = np.zeros([3, 9, 9, 3], np.uint8)
    cfg = data_config(in_memory.from_arrays(images, multi), augment="none", uncertain_policy=policy)
    run = take(cfg, 1, mode="supervised", global_batch_size=3, seed=0)[0]
    order = [int(i.decode().split("-")[1]) for i in run["case_id"]]  # case id = image index
    # NumPy reference of CheXpert's U-Ignore / U-Zeros / U-Ones; blank = negative.
    expected = (multi == 1) | ((multi == u) & (policy == "ones"))
    mask = np.where((multi == u) & (policy == "ignore"), 0.0, 1.0)
    np.testing.assert_array_equal(run["label"], expected[order].astype(np.float32))
    np.testing.assert_array_equal(run["label_mask"], mask[order])


@pytest.mark.parametrize("streamed", [False, True])
def test_label_fraction_keeps_whole_cases(tmp_path, streamed):
    sizes = [1, 2, 3, 2, 1, 3, 2, 2, 1, 3, 1, 2]  # 12 cases, classes alternate a/b
    if streamed:
        source = tiny_records.write(tmp_path, tiny_records.make_cases(sizes), num_shards=2)
    else:
        cases = tiny_records.make_cases(sizes)
        images = [np.zeros([6, 6], np.uint8) for c in cases for _ in c["images"]]
        labels = [label for c in cases for label in c["label_class"]]
        ids = [c["case_id"] for c in cases for _ in c["images"]]
        source = in_memory.from_arrays(np.stack(images), np.array(labels), ids)
    cfg = data_config(source, label_fraction=0.5, augment="none")
    assert pipeline.open_data(data_config(source), seed=0).label_fraction_cases() is None
    data = pipeline.open_data(cfg, seed=7)
    kept = data.label_fraction_cases()
    assert kept == pipeline.open_data(cfg, seed=7).label_fraction_cases()
    assert kept != pipeline.open_data(cfg, seed=8).label_fraction_cases()
    # Stratified: 3 of the 6 cases of each class.
    assert len(kept) == 6 and sum(int(c[-1]) % 2 for c in kept) == 3
    expected = sum(n for i, n in enumerate(sizes) if f"case{i:03d}" in kept)
    assert data.num_examples("supervised") == expected
    assert data.num_examples("simclr") == sum(sizes)  # pre-training: all
    run = take(cfg, expected, mode="supervised", global_batch_size=1, seed=7)
    assert sorted({b["case_id"][0].decode() for b in run}) == kept


def test_config_errors():
    with pytest.raises(ValueError, match="shufle_buffer"):
        pipeline.open_data(data_config(shufle_buffer=3), seed=0)
    data = pipeline.open_data(data_config(), seed=0)
    with pytest.raises(ValueError, match="mode='simclar'"):
        data.dataset("simclar", 2)
    with pytest.raises(ValueError, match="multiple of process_count=2"):
        data.dataset("simclr", 3, process_index=0, process_count=2)
    with pytest.raises(ValueError, match="uncertain_policy"):
        pipeline.open_data(data_config(uncertain_policy="maybe"), seed=0)
    with pytest.raises(ValueError, match="unknown augment policy 'fancy'"):
        pipeline.open_data(data_config(augment="fancy"), seed=0)
    with pytest.raises(ValueError, match="label_fraction=1.5"):
        pipeline.open_data(data_config(label_fraction=1.5), seed=0)
    unlabelled = in_memory.from_arrays(np.zeros([2, 4, 4], np.uint8))
    with pytest.raises(ValueError, match="needs labels"):
        pipeline.open_data(data_config(unlabelled), seed=0).num_examples("supervised")


def test_pairs_per_epoch_counts_images_by_default_in_every_mode(record_set):
    """Equal compute: a pre-training epoch is one pair per image whether the stream
    draws images (simclr) or cases (micle); epoch_unit='cases' counts cases."""
    cases = [1, 2, 3, 1, 2, 3, 2]
    for mode in ("simclr", "micle"):
        data = pipeline.open_data(data_config(record_set, mode=mode), seed=0)
        assert data.pairs_per_epoch() == sum(cases)
        cfg = data_config(record_set, mode=mode, epoch_unit="cases")
        assert pipeline.open_data(cfg, seed=0).pairs_per_epoch() == len(cases)
    # The micle stream itself still counts (and shuffles, and resumes over) cases.
    assert pipeline.open_data(data_config(record_set), seed=0).num_examples("micle") == len(cases)
    with pytest.raises(ValueError, match="epoch_unit='patients'"):
        pipeline.open_data(data_config(record_set, epoch_unit="patients"), seed=0)


# --- data.augment='auto': the policy chosen by the task (the medical configs' default) ---


def rgb_record_set(path, **info_fields):
    """Records of 5 cases of RGB noise (cases 1 and 3 hold two images); returns the source."""
    rng = np.random.default_rng(1)
    cases = [
        dict(
            case_id=f"rgb{i}",
            images=[
                tiny_records.png_bytes(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
                for _ in range(1 + i % 2)
            ],
            image_ids=[f"rgb{i}/{j}" for j in range(1 + i % 2)],
        )
        for i in range(5)
    ]
    source = tiny_records.write(path, cases, num_shards=1, label_type="none")
    if info_fields:
        info = records.load_info(str(path))
        for key, value in info_fields.items():
            setattr(info, key, value)
        records.write_info(str(path), info)
    return source


def medical_data(records_path, **args):
    """The data block of configs/micle_medical.py (runlocal) on the records at records_path."""
    arg = ",".join(
        [f"records={records_path}", "runlocal=True"] + [f"{k}={v}" for k, v in args.items()]
    )
    return recipes.medical_pretrain_config(arg, mode="micle").data


def policy_of(cfg):
    """(policy, why) of data.augment as the pipeline resolves it."""
    return pipeline.open_data(cfg, seed=0).augment_policy()


def colour_views(cfg):
    """bool [8]: which views of the first micle batch of 4 have channels that differ."""
    data = pipeline.open_data(cfg, seed=0)
    batch = next(data.dataset("micle", 4, process_index=0, process_count=1).as_numpy_iterator())
    views = np.concatenate([batch["view1"], batch["view2"]])
    return np.abs(views[..., 0] - views[..., 1]).max(axis=(1, 2)) > 0.05


def test_auto_augment_trains_rgb_records_with_simclrs_colour_policy(tmp_path):
    path = tmp_path / "derm"
    rgb_record_set(path)
    cfg = medical_data(path)
    # SimCLR's grayscale op turns 20% of views gray; the 'cxr' policy all of them.
    assert colour_views(cfg).mean() >= 0.5
    assert cfg.augment == "auto"  # the medical configs' default
    policy, why = policy_of(cfg)
    assert policy == "simclr" and "images are RGB" in why


def test_auto_augment_trains_gray_chest_xrays_with_the_cxr_policy():
    cfg = medical_data(recipes.DEMO_PRETRAIN_RECORDS)  # data/demo/hannover_cxr
    data = pipeline.open_data(cfg, seed=0)
    policy, why = data.augment_policy()
    assert policy == "cxr" and "hannover_cxr train images are gray" in why
    # The 'cxr' policy has no colour jitter: every view of the gray X-rays stays gray.
    assert not colour_views(cfg).any()


def test_recorded_modality_decides_auto_before_the_pixels(tmp_path):
    # The converter's --modality lands in dataset_info.json and wins over colour.
    npz = tmp_path / "rgb.npz"
    images = np.random.default_rng(2).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    np.savez(npz, train_images=images)
    write.convert(inputs.cases_from_npz(str(npz)), str(tmp_path / "x"), modality="cxr")
    assert records.load_info(str(tmp_path / "x")).modality == "cxr"
    policy, why = policy_of(medical_data(tmp_path / "x"))
    assert policy == "cxr" and "modality 'cxr'" in why
    rgb_record_set(tmp_path / "derm", modality="dermatology")
    assert policy_of(medical_data(tmp_path / "derm"))[0] == "simclr"
    # 'other' falls back to the pixels.
    rgb_record_set(tmp_path / "other", modality="other")
    assert policy_of(medical_data(tmp_path / "other"))[0] == "simclr"
    # Not recorded: dataset_info.json has no modality key (older files stay identical).
    rgb_record_set(tmp_path / "plain")
    assert "modality" not in (tmp_path / "plain" / records.INFO_FILE).read_text()
    with pytest.raises(inputs.ConversionError, match="--modality='xray'"):
        write.convert(inputs.cases_from_npz(str(npz)), str(tmp_path / "y"), modality="xray")


def test_explicit_augment_overrides_auto(tmp_path):
    path = tmp_path / "derm"
    rgb_record_set(path, modality="dermatology")
    cfg = medical_data(path, augment="cxr")
    assert policy_of(cfg) == ("cxr", "as configured")
    assert not colour_views(cfg).any()  # the 'cxr' policy's views are gray


def test_unknown_augment_policy_is_a_clear_error(tmp_path):
    path = tmp_path / "derm"
    rgb_record_set(path)
    with pytest.raises(ValueError, match="unknown augment policy 'simclrr'.*'auto'.*simclr"):
        pipeline.open_data(medical_data(path, augment="simclrr"), seed=0)


def _prefetch_depth(ds) -> int:
    """The buffer size of the last prefetch in a dataset's chain (-1: AUTOTUNE)."""
    while not isinstance(ds, tf.data.Dataset) or type(ds).__name__ != "_PrefetchDataset":
        ds = ds._input_dataset
    return int(ds._buffer_size)


@pytest.mark.parametrize("mode", ["simclr", "supervised"])
def test_prefetch_batches_is_the_training_streams_look_ahead(mode):
    data = pipeline.open_data(data_config(), seed=0)
    assert _prefetch_depth(data.dataset(mode, 2)) == tf.data.AUTOTUNE  # the default
    data = pipeline.open_data(data_config(prefetch_batches=16), seed=0)
    deep = data.dataset(mode, 2)
    assert _prefetch_depth(deep) == 16
    # Look-ahead changes when batches are made, never which: the same stream.
    shallow = pipeline.open_data(data_config(), seed=0).dataset(mode, 2)
    assert_same_batches(
        list(itertools.islice(deep.as_numpy_iterator(), 3)),
        list(itertools.islice(shallow.as_numpy_iterator(), 3)),
    )
    for bad in (0, -2, 2.5, "16", True):
        with pytest.raises(ValueError, match=r"data.prefetch_batches=.*-1 \(AUTOTUNE\) or"):
            pipeline.open_data(data_config(prefetch_batches=bad), seed=0)

"""One element of the input stream -> the example one mode trains on.

'simclr' and 'micle' get a contrastive pair of views (`ExampleMaker.simclr`,
`.micle`), 'supervised' and 'eval' one view with its labels. An element is
one unit of an epoch: an image (modes 'simclr', 'supervised', 'eval') or a
case ('micle'), as a dict

  {'case_id': string [], 'image_ids': string [n], 'label_class': int32 [n],
   'label_multi': float32 [n, C], plus its pixels: 'images': string [n]
   (encoded, decoded here) or 'first': int64 [] (index of its first image in
   an in-memory ImageTable)}

with n = 1 for an image unit. Every random choice (which two images, each
view's augmentation) comes from stateless ops keyed on the element's seed, so
an example is a pure function of (element, seed).
"""

from __future__ import annotations

import tensorflow as tf

from micle_jax.data import records
from micle_jax.data.augment import op_base, policies
from micle_jax.data.sources import image_table


class ImageReader:
    """Reads image i of an element: decodes it, or slices it out of an ImageTable.

    `channels` is 1 or 3 when every image has that many channels (an ImageTable
    that says so), else None: the channel count is then only known per image
    and views are built for both (tf.cond runs the one that applies).
    """

    def __init__(self, table: image_table.ImageTable | None = None):
        self.channels = None
        self.decodes = table is None  # each read decodes (ms per image) vs a slice
        if table is not None:
            self._pixels = tf.constant(table.pixels)
            self._offsets = tf.constant(table.offsets)
            self._shapes = tf.constant(table.shapes)
            kinds = set(table.shapes[:, 2].tolist())
            self.channels = kinds.pop() if len(kinds) == 1 else None

    def __call__(self, element: dict, i) -> tf.Tensor:
        """uint8 [h, w, c] image i of `element` (c = 1 or 3)."""
        if "images" in element:
            return image_table.decode_image(element["images"][i])
        index = element["first"] + tf.cast(i, tf.int64)
        shape = self._shapes[index]
        flat = tf.slice(self._pixels, [self._offsets[index]], [tf.reduce_prod(shape)])
        return tf.reshape(flat, shape)


def make_view(fn, image: tf.Tensor, seed, channels: int | None) -> tf.Tensor:
    """fn(image with static channels, seed) -> [s, s, 3] float32 in [0, 1].

    Gray images stay 1-channel through the augmentation (the colour ops then
    touch a third of the pixels); `fn` returns 3 channels either way.
    """
    if channels is not None:
        return fn(tf.ensure_shape(image, [None, None, channels]), seed)
    return tf.cond(
        tf.equal(tf.shape(image)[-1], 1),
        lambda: fn(tf.ensure_shape(image, [None, None, 1]), seed),
        lambda: fn(tf.ensure_shape(image, [None, None, 3]), seed),
    )


def pick_two(n: tf.Tensor, seed) -> tuple[tf.Tensor, tf.Tensor]:
    """Two image indices of a case of n images: different ones, uniformly, when n >= 2.

    MICLe (Azizi et al. 2021): the positive pair is one view of each of two
    different images of the case; a one-image case falls back to SimCLR's two
    views of one image (i == j == 0).

    Args:
      n: int32 [] number of images (>= 1).
      seed: [2] stateless seed.

    Returns:
      (i, j) int32 scalars.
    """
    u = op_base.draw_uniforms(seed, 2)

    def index(u, count):  # uniform in 0..count-1; min() in case u * count rounds up
        return tf.minimum(tf.cast(tf.floor(u * tf.cast(count, tf.float32)), tf.int32), count - 1)

    i = index(u[0], n)
    # j is uniform over the other n - 1 images: draw from n - 1 and skip i.
    j = index(u[1], tf.maximum(n - 1, 1))
    j = tf.where(n >= 2, j + tf.cast(j >= i, tf.int32), i)
    return i, j


def apply_uncertain_policy(label_multi: tf.Tensor, policy: str) -> tuple[tf.Tensor, tf.Tensor]:
    """Multilabel targets and mask from 1 / 0 / UNCERTAIN / MISSING values.

    CheXpert (Irvin et al. 2019) names the uncertain-label policies: 'ignore'
    (U-Ignore: masked out of the loss), 'zeros' (U-Zeros), 'ones' (U-Ones).
    A MISSING (blank) finding was not mentioned in the report and is a
    negative, as CheXpert trains on blanks.

    Args:
      label_multi: float32 [..., C].
      policy: 'ignore', 'zeros' or 'ones'.

    Returns:
      (labels, mask), both float32 [..., C]; mask is 0 where the label is ignored.
    """
    positive = tf.equal(label_multi, 1.0)
    uncertain = tf.equal(label_multi, records.UNCERTAIN)
    if policy == "ones":
        positive = positive | uncertain
    mask = tf.ones_like(label_multi)
    if policy == "ignore":
        mask = tf.where(uncertain, 0.0, 1.0)
    return tf.cast(positive, tf.float32), mask


class ExampleMaker:
    """Builds each mode's example from (element index k, element).

    Args:
      reader: an ImageReader.
      policy: augment policy for training views (policies.get_policy(...)).
      image_size: view side in pixels.
      label_type: 'none', 'multiclass' or 'multilabel'.
      uncertain_policy: 'ignore', 'zeros' or 'ones' (multilabel only).
      seed: [2] int64 root of this process's augmentation seeds.
    """

    def __init__(self, reader, policy, image_size, label_type, uncertain_policy, seed):
        self.reader = reader
        # One trace per input signature, shared by both views (tracing a policy
        # is most of the time it takes to build a pipeline).
        self.policy = tf.function(policy, autograph=False)
        self.image_size = image_size
        self.label_type = label_type
        self.uncertain_policy = uncertain_policy
        self.seed = seed

    def _seeds(self, k) -> tf.Tensor:
        """[3, 2] int64: element k's seeds for the pair choice, view 1 and view 2.

        One fold-in and one draw (random ops cost ~15-30 us each in tf.data).
        """
        element_seed = tf.random.experimental.stateless_fold_in(self.seed, k, alg=op_base.RNG_ALG)
        return tf.random.stateless_uniform(
            [3, 2], element_seed, minval=None, maxval=None, dtype=tf.int64, alg=op_base.RNG_ALG
        )

    def _view(self, image, seed) -> tf.Tensor:
        return make_view(self.policy, image, seed, self.reader.channels)

    def _contrastive_label(self, element, i) -> tf.Tensor:
        if self.label_type != "multiclass":
            return tf.constant(-1, tf.int32)
        return element["label_class"][i]

    def _contrastive(self, seeds, element, i, j) -> dict:
        image_i = self.reader(element, i)
        if j is None:
            image_j, j = image_i, i
        elif self.reader.decodes:
            # A one-image case (j == i) is decoded once, not twice.
            image_j = tf.cond(tf.equal(i, j), lambda: image_i, lambda: self.reader(element, j))
        else:
            image_j = self.reader(element, j)
        return {
            "view1": self._view(image_i, seeds[1]),
            "view2": self._view(image_j, seeds[2]),
            "label": self._contrastive_label(element, i),
            "multi_instance": tf.not_equal(i, j),
            "case_id": element["case_id"],
            "image_id1": element["image_ids"][i],
            "image_id2": element["image_ids"][j],
        }

    def simclr(self, k, element) -> dict:
        """Two views of one image: view1, view2 float32 [s, s, 3], label, case/image ids."""
        return self._contrastive(self._seeds(k), element, 0, None)

    def micle(self, k, element) -> dict:
        """One view each of two different images of a case (one image: two views of it)."""
        seeds = self._seeds(k)
        i, j = pick_two(tf.size(element["image_ids"], out_type=tf.int32), seeds[0])
        return self._contrastive(seeds, element, i, j)

    def _labels(self, element) -> dict:
        if self.label_type == "multilabel":
            labels, mask = apply_uncertain_policy(element["label_multi"][0], self.uncertain_policy)
            return {"label": labels, "label_mask": mask}
        return {"label": element["label_class"][0]}

    def supervised(self, k, element) -> dict:
        """One view: image float32 [s, s, 3], label int32 [] or float32 [C], label_mask [C]."""
        image = self._view(self.reader(element, 0), self._seeds(k)[1])
        return {"image": image, **self._labels(element), "case_id": element["case_id"]}

    def eval(self, k, element) -> dict:
        """Evaluation view (centre crop, resize), labels, ids and mask 1."""
        del k
        fn = lambda image, seed: policies.eval_transform(image, self.image_size)
        image = make_view(fn, self.reader(element, 0), None, self.reader.channels)
        return {
            "image": image,
            **self._labels(element),
            "case_id": element["case_id"],
            "image_id": element["image_ids"][0],
            "mask": tf.constant(1.0),
        }

    def eval_padding(self, num_classes: int) -> dict:
        """An all-zero eval example with mask 0, same structure as `eval`."""
        s = self.image_size
        pad = {"image": tf.zeros([s, s, 3])}
        if self.label_type == "multilabel":
            pad["label"] = tf.zeros([num_classes])
            pad["label_mask"] = tf.zeros([num_classes])
        else:
            pad["label"] = tf.constant(-1, tf.int32)
        pad.update(case_id=tf.constant(""), image_id=tf.constant(""), mask=tf.constant(0.0))
        return pad

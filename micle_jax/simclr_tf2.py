"""SimCLR's official TF2 checkpoints as this framework's Flax variables.

google-research/simclr (tf2/) writes models in two formats, both read here:
- a SavedModel (`run.build_saved_model`; the released SimCLR v1 and v2
  models, gs://simclr-checkpoints-tf2/...), whose variables/ folder is a TF
  checkpoint;
- a training checkpoint (`tf.train.Checkpoint(model=model, ...)` of
  `tf2/run.py`).

Both carry TensorFlow's object graph: every variable is reached from the root
through named children (`model/resnet_model/block_groups/2/layers/0/...`).
`read_variables` walks that graph along the model's own attributes (skipping
the SavedModel's `variables` / `trainable_variables` aliases), so the two
formats give the same structural names. `to_flax` maps them onto the Flax
modules of micle_jax/models (resnet.py and heads.py follow SimCLR's layout
layer for layer) and infers depth, width, selective kernels, stem and heads
from what is there.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections import defaultdict

import numpy as np

from micle_jax import config_lib
from micle_jax.models import resnet

# Children that alias variables already reached through a layer attribute,
# or that hold no variables (functions, metrics, signatures).
_ALIASES = {
    "variables",
    "trainable_variables",
    "non_trainable_variables",
    "trainable_variables_list",
    "keras_api",
    "signatures",
    "__call__",
    "_jit_compiled_convolution_op",
    "layer_metrics",
    "metrics",
    "regularization_losses",
    "layer_regularization_losses",
    "call_and_return_all_conditional_losses",
    "call_and_return_conditional_losses",
}

# Keras BatchNormalization variable -> (Flax collection, name).
_BN = {
    "gamma": ("params", "scale"),
    "beta": ("params", "bias"),
    "moving_mean": ("batch_stats", "mean"),
    "moving_variance": ("batch_stats", "var"),
}
# SK_Conv2D's sublayers -> SelectiveKernelConv's (micle_jax/models/resnet.py).
_SK = {
    "conv2d_fixed_padding/conv2d": "conv",
    "batch_norm_relu/bn": "bn",
    "conv2d_0": "squeeze_conv",
    "batch_norm_relu_1/bn": "squeeze_bn",
    "conv2d_1": "mixing_conv",
}
_STEM = re.compile(r"model/resnet_model/initial_conv_relu_max_pool/(\d+)/(.+)")
_BLOCK = re.compile(r"model/resnet_model/block_groups/(\d+)/layers/(\d+)/(\w+)/(\d+)/(.+)")
_PROJ = re.compile(r"model/_projection_head/linear_layers/(\d+)/(dense/kernel|bn_relu/bn/\w+)")
_HEAD = re.compile(r"model/supervised_head/linear_layer/dense/(kernel|bias)")
# A block's two lists: the projection shortcut, and the residual branch.
_SHORTCUT_LISTS = ("projection_layers", "shortcut_layers")
_BRANCH_LISTS = {"conv_relu_dropblock_layers": "bottleneck", "conv2d_bn_layers": "basic"}


@dataclasses.dataclass
class Architecture:
    """What a SimCLR checkpoint holds, in micle_jax model config fields."""

    depth: int
    width: float
    sk_ratio: float
    cifar_stem: bool
    proj_layers: int
    proj_dim: int
    num_classes: int

    @property
    def name(self) -> str:
        """SimCLR's release name, e.g. 'r50_1x_sk0' (width 0.25: 'r50_0.25x_sk1')."""
        width = f"{self.width:g}"
        return f"r{self.depth}_{width}x_sk{int(self.sk_ratio > 0)}"

    @property
    def arch(self) -> str:
        """The config argument `arch=` of micle_jax's configs, e.g. 'r50x1' or 'r152x3_sk'."""
        return f"r{self.depth}x{self.width:g}" + ("_sk" if self.sk_ratio > 0 else "")


def find_checkpoint(src: str) -> tuple[str, str]:
    """The TF checkpoint prefix inside `src` and its format.

    Args:
      src: a SavedModel folder (saved_model.pb + variables/), a training
        checkpoint prefix (`.../ckpt-10`) or a folder of training checkpoints
        (its latest one, as `tf.train.latest_checkpoint`).

    Returns:
      (checkpoint prefix, 'saved_model' | 'checkpoint').
    """
    import tensorflow as tf

    path = os.path.abspath(os.path.expanduser(src))
    if os.path.isfile(os.path.join(path, "saved_model.pb")):
        prefix = os.path.join(path, "variables", "variables")
        if not os.path.isfile(prefix + ".index"):
            raise ValueError(
                f"--src={src}: SavedModel without variables/variables.index (an incomplete "
                "copy?); download the whole folder again"
            )
        return prefix, "saved_model"
    if os.path.isfile(path + ".index"):
        return path, "checkpoint"
    if os.path.isdir(path):
        latest = tf.train.latest_checkpoint(path)
        if latest:
            return latest, "checkpoint"
        raise ValueError(
            f"--src={src} is a folder with neither saved_model.pb nor a TF checkpoint "
            "(a 'checkpoint' file and ckpt-N.index); give a SimCLR TF2 SavedModel folder, "
            "a tf2/run.py model_dir or one of its ckpt-N prefixes"
        )
    raise FileNotFoundError(
        f"--src={src} does not exist (for a checkpoint, give the prefix without "
        ".index, e.g. model_dir/ckpt-1)"
    )


def read_variables(prefix: str) -> dict[str, np.ndarray]:
    """{structural path: array} of every variable of a TF2 checkpoint's object graph.

    Args:
      prefix: a checkpoint prefix from `find_checkpoint`.
    """
    import tensorflow as tf
    from tensorflow.core.protobuf import trackable_object_graph_pb2

    try:
        reader = tf.train.load_checkpoint(prefix)
        graph_bytes = reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH")
    except (tf.errors.OpError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"{prefix} is not a readable TF2 object-based checkpoint ({first}). TF1 checkpoints "
            "of simclr's tf/ code are not supported: use the TF2 release "
            "(gs://simclr-checkpoints-tf2) or a checkpoint written by tf2/run.py"
        ) from e
    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(graph_bytes)
    found: dict[str, np.ndarray] = {}
    seen = set()
    queue = [(0, "")]
    while queue:  # breadth first: the shortest path names a variable
        node_id, path = queue.pop(0)
        if node_id in seen:
            continue
        seen.add(node_id)
        node = graph.nodes[node_id]
        for attribute in node.attributes:
            if attribute.name == "VARIABLE_VALUE":
                found[path] = reader.get_tensor(attribute.checkpoint_key)
        for child in node.children:
            if child.local_name in _ALIASES or child.local_name.startswith("trace_"):
                continue
            queue.append((child.node_id, f"{path}/{child.local_name}".lstrip("/")))
    return found


def _layer_kind(subpaths: set[str]) -> str:
    if "conv2d/kernel" in subpaths:
        return "conv"
    if "bn/gamma" in subpaths or "bn/moving_mean" in subpaths:
        return "bn"
    if any(p.startswith("conv2d_fixed_padding/") for p in subpaths):
        return "sk"
    raise ValueError(f"unrecognised SimCLR layer with variables {sorted(subpaths)}")


def _bn_leaves(prefix: str, module: str, subpath: str) -> tuple[str, str]:
    """('params' | 'batch_stats', Flax path) of a Keras BatchNormalization variable."""
    collection, name = _BN[subpath.rsplit("/", 1)[-1]]
    return collection, f"{prefix}/{module}/{name}"


# Where each layer sits in SimCLR's Keras lists (tf2/resnet.py), by list index;
# the other indices hold variable-free layers (DropBlock, identity, pooling).
_STEM_ONE_CONV = {0: "conv1", 2: "bn1"}  # conv7x7/2 or the CIFAR conv3x3/1
_STEM_SK = {0: "conv1", 1: "bn1", 2: "conv2", 3: "bn2", 4: "conv3", 6: "bn3"}
_BRANCH_LAYOUTS = {
    ("conv_relu_dropblock_layers", False): {
        0: "conv1",
        1: "bn1",
        3: "conv2",
        4: "bn2",
        6: "conv3",
        7: "bn3",
    },
    ("conv_relu_dropblock_layers", True): {
        0: "conv1",
        1: "bn1",
        3: "sk_conv",
        5: "conv3",
        6: "bn3",
    },
    ("conv2d_bn_layers", False): {0: "conv1", 1: "bn1", 2: "conv2", 3: "bn2"},
}
# ResNet-18/34 with selective kernels only change the stem and the shortcuts.
_BRANCH_LAYOUTS["conv2d_bn_layers", True] = _BRANCH_LAYOUTS["conv2d_bn_layers", False]


def _module_kind(module: str | None) -> str | None:
    """'conv', 'bn' or 'sk' for a Flax module name of the layouts (None: no module)."""
    if module is None:
        return None
    if module == "sk_conv":
        return "sk"
    return "conv" if "conv" in module else "bn"


def _layer_names(
    items: dict[int, dict[str, str]], prefix: str, layout: dict[int, str] | None
) -> dict:
    """{TF variable: (collection, Flax path)} of one Keras layer list.

    Args:
      items: {list index: {path inside the layer: TF variable}}.
      prefix: the Flax module path of the list's owner.
      layout: {list index: Flax module} (`_STEM_*`, `_BRANCH_LAYOUTS`), or
        None for a projection shortcut, whose conv and BatchNorm are
        `proj_conv` and `proj_bn` wherever pooling put them.
    """
    out = {}
    for index, subpaths in sorted(items.items()):
        kind = _layer_kind(set(subpaths))
        if layout is None:
            module = {"conv": "proj_conv", "bn": "proj_bn"}.get(kind)
        else:
            module = layout.get(index)
        if _module_kind(module) != kind:
            raise ValueError(
                f"{next(iter(subpaths.values()))}: a {kind} layer where SimCLR's model has "
                f"{module or 'no layer with variables'}"
            )
        for subpath, source in subpaths.items():
            if kind == "conv":
                out[source] = ("params", f"{prefix}/{module}/kernel")
            elif kind == "bn":
                out[source] = _bn_leaves(prefix, module, subpath)
            else:
                layer, _, leaf = subpath.rpartition("/")
                if layer not in _SK:
                    raise ValueError(f"{source}: unrecognised selective-kernel variable")
                sk_module = f"{prefix}/sk_conv/{_SK[layer]}"
                if leaf == "kernel":
                    out[source] = ("params", f"{sk_module}/kernel")
                else:
                    collection, name = _BN[leaf]
                    out[source] = (collection, f"{sk_module}/{name}")
    return out


def _group(tf_vars: dict[str, np.ndarray]):
    """Sorts a checkpoint's model variables into stem, blocks, projection and head."""
    stem: dict[int, dict[str, str]] = defaultdict(dict)
    blocks: dict[tuple[int, int], dict] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(dict))
    )
    proj: dict[int, dict[str, str]] = defaultdict(dict)
    head: dict[str, str] = {}
    unknown = []
    for path in tf_vars:
        if not path.startswith("model/"):
            continue  # global_step, save_counter, the optimizer and its slots
        if m := _STEM.fullmatch(path):
            stem[int(m[1])][m[2]] = path
        elif m := _BLOCK.fullmatch(path):
            lists = blocks[(int(m[1]), int(m[2]))]
            lists[m[3]][int(m[4])][m[5]] = path
        elif m := _PROJ.fullmatch(path):
            proj[int(m[1])][m[2]] = path
        elif m := _HEAD.fullmatch(path):
            head[m[1]] = path
        else:
            unknown.append(path)
    if unknown:
        named = [f"{p} {tuple(np.shape(tf_vars[p]))}" for p in unknown[:3]]
        raise ValueError(
            f"{len(unknown)} variable(s) are not part of SimCLR's TF2 model (ResNet, projection "
            f"head, supervised head), e.g. {', '.join(named)}, where the model expects none; "
            "squeeze-excitation (se_ratio > 0) and other variants are not supported"
        )
    if not stem or not blocks:
        raise ValueError(
            "no SimCLR ResNet in the checkpoint (no variables under model/resnet_model/); "
            "is it a SimCLR TF2 model?"
        )
    return stem, blocks, proj, head


def _depth(blocks: dict) -> tuple[int, str]:
    """ResNet depth and block type from the blocks present."""
    kinds = {_BRANCH_LISTS.get(name) for lists in blocks.values() for name in lists} - {None}
    groups = sorted({g for g, _ in blocks})
    counts = tuple(len({b for g2, b in blocks if g2 == g}) for g in groups)
    if len(kinds) != 1 or groups != [0, 1, 2, 3]:
        raise ValueError(
            f"ResNet with block groups {groups} and block types {sorted(kinds)}: SimCLR's "
            "ResNets have 4 groups of one block type"
        )
    (kind,) = kinds
    for depth, (block, num_blocks) in resnet.DEPTHS.items():
        if block == kind and tuple(num_blocks) == counts:
            return depth, kind
    raise ValueError(
        f"{kind} blocks per group {counts} match no ResNet depth "
        f"({', '.join(f'{d}: {n}' for d, (_, n) in resnet.DEPTHS.items())})"
    )


def to_flax(tf_vars: dict[str, np.ndarray]) -> tuple[dict, Architecture, dict[str, str]]:
    """Maps a SimCLR TF2 model's variables onto micle_jax's SimCLRModel.

    Args:
      tf_vars: from `read_variables`.

    Returns:
      variables: {'params', 'batch_stats'} nested dicts of float32 arrays,
        with the SimCLRModel names (backbone, projection_head, head).
      arch: the architecture the variables describe.
      sources: {'collection/flax/path': the TF variable it came from}.
    """
    stem, blocks, proj, head = _group(tf_vars)
    depth, _ = _depth(blocks)
    # Selective kernels: SK convs in bottlenecks, ResNet-D shortcuts (pooling
    # before the conv, so the conv is not the list's first layer) in any block.
    sk = any(
        _layer_kind(set(items[i])) == "sk"
        or (name in _SHORTCUT_LISTS and _layer_kind(set(items[i])) == "conv" and i > 0)
        for lists in blocks.values()
        for name, items in lists.items()
        for i in items
    )
    stem_convs = [
        tf_vars[stem[i]["conv2d/kernel"]].shape for i in sorted(stem) if "conv2d/kernel" in stem[i]
    ]
    names = _layer_names(stem, "backbone/stem", _STEM_SK if len(stem_convs) > 1 else _STEM_ONE_CONV)
    for (g, b), lists in blocks.items():
        prefix = f"backbone/block_group{g + 1}/block{b + 1}"
        for list_name, items in lists.items():
            layout = None if list_name in _SHORTCUT_LISTS else _BRANCH_LAYOUTS[(list_name, sk)]
            names.update(_layer_names(items, prefix, layout))
    for j, subpaths in proj.items():
        for subpath, source in subpaths.items():
            if subpath == "dense/kernel":
                names[source] = ("params", f"projection_head/dense{j + 1}/kernel")
            else:
                names[source] = _bn_leaves("projection_head", f"bn{j + 1}", subpath)
    for leaf, source in head.items():
        names[source] = ("params", f"head/dense/{leaf}")

    base = int(stem_convs[-1][-1])
    cifar = len(stem_convs) == 1 and stem_convs[0][0] == 3
    expected_convs = 1 if cifar or not sk else 3
    if len(stem_convs) != expected_convs or base < 1:
        raise ValueError(
            f"stem with convolutions {[tuple(s) for s in stem_convs]} is none of SimCLR's "
            "(conv7x7, three 3x3 with selective kernels, or the CIFAR conv3x3)"
        )
    last_dense = proj[max(proj)]["dense/kernel"] if proj else None
    arch = Architecture(
        depth=depth,
        width=base / 64,
        sk_ratio=config_lib.SK_RATIO if sk else 0.0,
        cifar_stem=cifar,
        proj_layers=len(proj),
        proj_dim=int(tf_vars[last_dense].shape[-1]) if last_dense else 128,
        num_classes=int(tf_vars[head["kernel"]].shape[-1]) if "kernel" in head else 0,
    )
    variables: dict[str, dict] = {"params": {}, "batch_stats": {}}
    sources = {}
    for source, (collection, path) in names.items():
        node = variables[collection]
        *parents, leaf = path.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = np.asarray(tf_vars[source], np.float32)
        sources[f"{collection}/{path}"] = source
    return variables, arch, sources

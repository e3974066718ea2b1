"""Names and versions of the on-disk activation store: the single source for code, tests and FORMAT.md.

FORMAT.md beside this file is the normative description; ``tests/cache/test_format_doc.py``
fails if a name below is missing from it or the document names something not listed here.
"""

FORMAT_VERSION = 2
"""Bumped whenever an array, attribute or layout below changes meaning; readers refuse other versions."""

KIND_ACTIVATIONS = "activations"
KIND_CODES = "codes"

# Sparse code store (codes.zarr): per-shard CSR groups plus the same `done` array.
CODES_SHARDS = "shards"
CODES_ARRAYS = ("token_ptr", "indices", "values")

# Arrays (paths inside the store's Zarr group).
ACTS_GROUP = "acts"
"""Group holding one array per tapped layer, named by its block index: ``acts/10``."""
LABELS = "labels"
IMAGE_IDS = "image_ids"
VALID = "valid"
DONE = "done"
CHECKSUMS = "checksums"
"""xxh3-64 digests of every chunk's content, written with its shard; readers check what they read."""

ARRAYS = (ACTS_GROUP, LABELS, IMAGE_IDS, VALID, DONE, CHECKSUMS)

# Group attributes.
ATTR_FORMAT_VERSION = "format_version"
ATTR_KIND = "kind"
ATTR_CONFIG = "config"
ATTR_CONFIG_SHA256 = "config_sha256"
ATTR_MODEL = "model"
ATTR_LAYERS = "layers"
ATTR_TOKEN_LAYOUT = "token_layout"
ATTR_PREPROCESS = "preprocess"
ATTR_DATASET = "dataset"
ATTR_CLASS_NAMES = "class_names"
ATTR_N_IMAGES = "n_images"
ATTR_IMAGES_PER_CHUNK = "images_per_chunk"
ATTR_IMAGES_PER_SHARD = "images_per_shard"
ATTR_VERSIONS = "versions"
ATTR_SKIPPED = "skipped_images"
ATTR_WRITER = "writer"
"""The command that created the store (stage, settings, working folder): what `pipeline repair` reruns."""

ATTRS = (
    ATTR_FORMAT_VERSION,
    ATTR_KIND,
    ATTR_CONFIG,
    ATTR_CONFIG_SHA256,
    ATTR_MODEL,
    ATTR_LAYERS,
    ATTR_TOKEN_LAYOUT,
    ATTR_PREPROCESS,
    ATTR_DATASET,
    ATTR_CLASS_NAMES,
    ATTR_N_IMAGES,
    ATTR_IMAGES_PER_CHUNK,
    ATTR_IMAGES_PER_SHARD,
    ATTR_VERSIONS,
    ATTR_SKIPPED,
    ATTR_WRITER,
)

LOCK_FILE = ".lock"
"""Advisory lock (``flock``) held by the one process allowed to write the store."""
CREATING_FILE = ".creating"
"""Present while a store is being created; a store still holding it was cut short and is recreated."""

ACTS_DTYPE = "float16"
TARGET_CHUNK_BYTES = 3 * 2**20
TARGET_SHARD_BYTES = 64 * 2**20


def acts_path(layer: int) -> str:
    """Path of a layer's activation array inside the store."""
    return f"{ACTS_GROUP}/{layer}"

r"""`var-jax pretokenize`: encodes a data set's images to token maps once, for pre-tokenized training.

    var-jax pretokenize --config configs/var_d16.py --tokenizer vae_ch160v4096z32.pth \
        --out gs://BUCKET/imagenet_tokens --variants 10 \
        --config.data.data_dir=gs://BUCKET/tensorflow_datasets
    var-jax train --config configs/var_d16.py --workdir gs://BUCKET/var_d16 \
        --config.data.source=pretokenized --config.data.data_dir=gs://BUCKET/imagenet_tokens

The config is a training config (the same file `var-jax train` takes): its `data` section names the
image source and the augmentation, its `patch_nums` the scales, and its `tokenizer` the tokenizer
unless --tokenizer is given. `--config.x=y` overrides fields as for `var-jax train`. The tokenizer
is loaded the ways training loads it: an official .pth file, a directory written by `var-jax
convert`, or a `var-jax train-tokenizer` workdir.

Variant v of every image is its training augmentation of epoch v (see
`var_jax.data.pretokenize`). Hosts can split the work without talking to each other: run the
command on each with --process-index=p --process-count=P; re-running it only writes the shards
that are missing.

Sets written by earlier versions (format v1, npz shards) convert once, without the tokenizer and
with the tokens unchanged, to the array_record format training reads (again splittable over hosts):

    var-jax pretokenize --convert-from gs://BUCKET/imagenet_tokens_v1 --out /mnt/tokens_v2
"""
from __future__ import annotations

import argparse
import functools
import sys
from typing import Sequence

import numpy as np

from var_jax.cli import common
from var_jax.errors import ConfigError, InputError, VarJaxError

PROG = "var-jax pretokenize"


def build_parser() -> argparse.ArgumentParser:
  """The command's flags; config overrides (`--config.x=y`) are parsed separately."""
  parser = common.new_parser(
      PROG, __doc__, epilog="Any --config.FIELD=VALUE overrides a field of the config, e.g. "
      "--config.data.data_dir=DIR or --config.data.split=train.")
  parser.add_argument("--config", default=None,
                      help="training config file (e.g. configs/var_d16.py, with ':args' if it takes "
                           "any); its data, patch_nums and tokenizer sections are read (required "
                           "unless --convert-from)")
  parser.add_argument("--out", required=True, help="directory for meta.json and the token shards (gs:// ok)")
  parser.add_argument("--convert-from", default=None, metavar="V1_DIR",
                      help="instead of encoding images, convert the format-v1 (npz) set in V1_DIR "
                           "to the array_record format in --out (tokens unchanged; only "
                           "--process-index/--process-count apply)")
  parser.add_argument("--tokenizer", default=None,
                      help="official .pth file, `var-jax convert` directory or train-tokenizer "
                           "workdir (default: the config's tokenizer.path)")
  parser.add_argument("--patch-nums", type=common.int_list("--patch-nums", "1,2,3,4,5,6,8,10,13,16"), default=None,
                      help="scales, e.g. 1,2,3,4,5,6,8,10,13,16 (default: the config's patch_nums)")
  parser.add_argument("--variants", type=int, default=1,
                      help="augmented views encoded per image (training picks one per epoch)")
  parser.add_argument("--num-shards", type=int, default=8, help="shard files to split the records into")
  parser.add_argument("--batch-size", type=int, default=64, help="images per encoder call")
  parser.add_argument("--seed", type=int, default=None,
                      help="seeds the augmentations (default: the config's seed)")
  parser.add_argument("--process-index", type=int, default=0,
                      help="this host's index: it writes the shards s with s %% count == index")
  parser.add_argument("--process-count", type=int, default=1, help="hosts sharing the work")
  return parser


def tokenizer_spec(config, tokenizer: str | None, patch_nums: Sequence[int] | None):
  """The small config `train_var.load_tokenizer` reads: {tokenizer: {path, overrides}, patch_nums}."""
  import ml_collections
  from etils import epath
  if patch_nums is None:
    if config.get("patch_nums") is None:
      raise ConfigError("the config has no patch_nums: pass --patch-nums, e.g. 1,2,3,4,5,6,8,10,13,16.")
    patch_nums = config.patch_nums
  configured = config.get("tokenizer") or {}
  if tokenizer is None:
    path = str(configured.get("path", "") or "")
    overrides = dict(configured.get("overrides", {}) or {})
    seed = configured.get("seed", 0)
  else:
    # The config's overrides describe its own tokenizer (e.g. a random one's widths), not this one.
    path, seed = tokenizer, 0
    overrides = dict(configured.get("overrides", {}) or {}) if tokenizer == "random" else {}
  if not path:
    raise ConfigError("no tokenizer: pass --tokenizer (an official .pth file, a `var-jax convert` "
                      "directory or a train-tokenizer workdir), or set tokenizer.path in the config.")
  if path != "random" and not epath.Path(path).exists():
    raise InputError(f"tokenizer {path}: no such file or directory. Pass --tokenizer with an official "
                     ".pth file (e.g. vae_ch160v4096z32.pth), a `var-jax convert` directory or a "
                     "train-tokenizer workdir.")
  return ml_collections.ConfigDict({
      "patch_nums": tuple(int(p) for p in patch_nums),
      "tokenizer": {"path": path, "overrides": overrides, "seed": seed},
  })


def make_encode_fn(vae_cfg, vae_params, batch_size: int):
  """uint8 (n, H, W, 3) images, n <= batch_size -> int32 (n, L) concatenated token maps.

  Every call runs one jitted encode on a batch padded to `batch_size` (rounded up to a multiple of
  the local device count and split over the local devices), so it compiles once.
  """
  import jax
  import jax.numpy as jnp
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  from var_jax.data.augment import scale_to_model_range
  from var_jax.models.vqvae import VQVAE

  module = VQVAE(vae_cfg)
  devices = jax.local_devices()
  padded = -(-batch_size // len(devices)) * len(devices)
  mesh = Mesh(np.asarray(devices), ("batch",))
  batch_sharding = NamedSharding(mesh, P("batch"))
  params = jax.device_put(vae_params, NamedSharding(mesh, P()))

  @functools.partial(jax.jit, out_shardings=batch_sharding)
  def encode(params, images):
    maps = module.apply({"params": params}, scale_to_model_range(images), method=VQVAE.encode)
    return jnp.concatenate([m.reshape(m.shape[0], -1) for m in maps], axis=1).astype(jnp.int32)

  size = vae_cfg.image_size

  def encode_fn(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    n = images.shape[0]
    if images.shape[1:] != (size, size, 3) or n > padded:
      raise InputError(f"encode_fn takes at most {padded} uint8 images of {size}x{size}x3, got "
                       f"{images.dtype} {images.shape}.")
    batch = np.zeros((padded, size, size, 3), np.uint8)
    batch[:n] = images
    return np.asarray(encode(params, jax.device_put(batch, batch_sharding)))[:n]

  return encode_fn


def pretokenize(config, out: str, *, tokenizer: str | None = None,
                patch_nums: Sequence[int] | None = None, num_variants: int = 1, num_shards: int = 8,
                batch_size: int = 64, seed: int | None = None, process_index: int = 0,
                process_count: int = 1, progress: bool = True) -> dict:
  """Encodes config.data's split with the tokenizer and writes the shards to `out`.

  Args:
    config: a training config: `data` (an image source), `patch_nums`, `tokenizer`, `seed`.
    out: directory for meta.json and the shards.
    tokenizer: replaces config.tokenizer.path (its overrides are then not applied).
    patch_nums: replaces config.patch_nums.
    num_variants: augmented views per image.
    num_shards: shard files.
    batch_size: images per encoder call.
    seed: seeds the augmentations; default config.seed (or 0).
    process_index: this host, in [0, process_count).
    process_count: hosts sharing the work.
    progress: show a progress bar on stderr.

  Returns:
    What `write_pretokenized` returns, plus "tokenizer_path".
  """
  from var_jax.data.pretokenize import write_pretokenized
  from var_jax.train.train_var import load_tokenizer

  data = config.get("data")
  if data is None:
    raise ConfigError("the config has no data section: use a training config such as "
                      "configs/var_d16.py or configs/var_tiny.py.")
  if data.get("source") == "pretokenized":
    raise ConfigError("the config reads pre-tokenized data (data.source='pretokenized'); "
                      "pretokenize reads images: pass --config.data.source=tfds, folder or shapes "
                      "(with its data.data_dir), e.g. the same config without ':pretokenized'.")
  for value, flag in ((num_variants, "--variants"), (num_shards, "--num-shards"),
                      (batch_size, "--batch-size"), (process_count, "--process-count")):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ConfigError(f"{flag} must be a positive int, got {value!r}.")
  if not 0 <= process_index < process_count:
    raise ConfigError(f"--process-index {process_index} is outside [0, --process-count {process_count}).")
  spec = tokenizer_spec(config, tokenizer, patch_nums)
  vae_cfg, vae_params = load_tokenizer(spec)
  if data.image_size != vae_cfg.image_size:
    raise ConfigError(
        f"data.image_size {data.image_size} is not the tokenizer's image size {vae_cfg.image_size} "
        f"(16 x the last patch number {vae_cfg.patch_nums[-1]}): pass --config.data.image_size="
        f"{vae_cfg.image_size} or other --patch-nums.")
  if seed is None:
    seed = int(config.get("seed", 0) or 0)
  encode = make_encode_fn(vae_cfg, vae_params, batch_size)
  bar = None
  if progress:
    from tqdm import tqdm
    bar = tqdm(desc="encoding", unit="image", file=sys.stderr)

  def encode_fn(images: np.ndarray) -> np.ndarray:
    tokens = encode(images)
    if bar is not None:
      bar.update(len(images))
    return tokens

  try:
    result = write_pretokenized(
        data, encode_fn, out, patch_nums=vae_cfg.patch_nums, vocab_size=vae_cfg.vocab_size,
        num_variants=num_variants, num_shards=num_shards, batch_size=batch_size, seed=seed,
        process_index=process_index, process_count=process_count)
  finally:
    if bar is not None:
      bar.close()
  return {**result, "tokenizer_path": spec.tokenizer.path}


def main(argv=None) -> int:
  """`var-jax pretokenize ...`; argv[0] is the program name. Returns the exit status."""
  argv = list(sys.argv if argv is None else argv)
  parser = build_parser()
  args, _ = parser.parse_known_args(argv[1:])
  if args.convert_from is not None:
    return _convert(parser, argv[1:])
  if args.config is None:
    parser.error("the following arguments are required: --config (or --convert-from V1_DIR)")
  args, config = common.parse_with_config(parser, argv[1:])
  common.check_output_dir(args.out, "--out", remote_ok=True)  # token shards go through etils
  try:
    result = pretokenize(
        config, args.out, tokenizer=args.tokenizer, patch_nums=args.patch_nums,
        num_variants=args.variants, num_shards=args.num_shards, batch_size=args.batch_size,
        seed=args.seed, process_index=args.process_index, process_count=args.process_count)
  except VarJaxError as e:
    print(f"{PROG}: error: {e}", file=sys.stderr)
    return 2
  meta = result["meta"]
  if result["tokenizer_path"] == "random":
    print("warning: the tokenizer is randomly initialised (tokenizer.path='random'): these tokens "
          "are only good for smoke tests.")
  print(f"{meta['count']} records x {meta['num_variants']} variants of split "
        f"{meta['source']['split']!r} ({meta['source']['source']}), patch_nums {meta['patch_nums']}, "
        f"vocab {meta['vocab_size']}: wrote shards {result['shards_written']}"
        + (f", kept the finished shards {result['shards_kept']}" if result["shards_kept"] else "")
        + (f", skipped {result['corrupt_skipped']} unreadable images" if result["corrupt_skipped"] else "")
        + f" in {args.out}")
  if args.process_count > 1:
    print(f"This was host {args.process_index} of {args.process_count}: run the same command with "
          "the other --process-index values before training (a missing shard is an error there).")
  print("Train on them with: var-jax train --config CONFIG --workdir WORKDIR "
        f"--config.data.source=pretokenized --config.data.data_dir={args.out}")
  return 0


def _convert(parser: argparse.ArgumentParser, argv: Sequence[str]) -> int:
  """`--convert-from V1_DIR --out DIR`: rewrites a v1 set in the array_record format."""
  from var_jax.data import token_shards
  args = parser.parse_args(argv)
  encoding_flags = [flag for flag, value, default in (
      ("--config", args.config, None), ("--tokenizer", args.tokenizer, None),
      ("--patch-nums", args.patch_nums, None), ("--variants", args.variants, 1),
      ("--num-shards", args.num_shards, 8), ("--seed", args.seed, None)) if value != default]
  if encoding_flags:
    parser.error(f"--convert-from keeps the tokens as they are: drop {', '.join(encoding_flags)}")
  try:
    common.check_output_dir(args.out, "--out", remote_ok=True)  # token shards go through etils
    result = token_shards.convert_v1(args.convert_from, args.out, process_index=args.process_index,
                                     process_count=args.process_count)
  except VarJaxError as e:
    print(f"{PROG}: error: {e}", file=sys.stderr)
    return 2
  meta = result["meta"]
  print(f"converted {meta['count']} records x {meta['num_variants']} variants from "
        f"{args.convert_from} (v1): wrote shards {result['shards_written']}"
        + (f", kept the finished shards {result['shards_kept']}" if result["shards_kept"] else "")
        + f" in {args.out}")
  print("Train on them with: var-jax train --config CONFIG --workdir WORKDIR "
        f"--config.data.source=pretokenized --config.data.data_dir={args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

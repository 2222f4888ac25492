"""`var-jax edit`: zero-shot in-painting, out-painting and class editing of one image. The mask is
a greyscale PNG of the image size: white = keep, black = generate (--white-is-generate inverts)."""
from __future__ import annotations

import sys

from var_jax.cli import common
from var_jax.cli.sample import add_sampling_flags

PROG = "var-jax edit"


def cmd_edit(args) -> int:
  import jax
  import numpy as np
  from var_jax.inference import images as image_io
  from var_jax.inference.placement import sampling_mesh
  from var_jax.inference.edit import edit
  from var_jax.inference.filters import check_sampling_options

  common.check_output_file(args.out, "--out", remote_ok=False)
  from var_jax.parallel.distributed import maybe_initialize_distributed
  maybe_initialize_distributed("auto")  # every host of a pod joins before any JAX call
  model = common.load_model(args.model, args.dtype, args.tokenizer_dtype)
  size = model.tokenizer.config.image_size
  image = image_io.load_image(args.image, size)
  mask = image_io.load_image(args.mask, size, mode="L").astype(np.float32) / 255.0
  label = args.class_id if args.class_id is not None else model.config.num_classes
  model.check_labels(np.asarray([label]), allow_null=True)
  check_sampling_options(model, args.cfg, args.top_k, args.top_p)
  keep = mask >= 0.5 if not args.white_is_generate else mask < 0.5
  out = edit(model, image[None], keep.astype(np.float32), [label], rng=jax.random.key(args.seed),
             cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, more_smooth=args.more_smooth,
             mesh=sampling_mesh(*args.mesh))
  edited = np.asarray(out)[0]
  if jax.process_index() == 0:  # on a pod every host computes the same image; one writes it
    path = image_io.save_png(edited, args.out)
    print(f"wrote the edited image to {common.shown(path)}")
  return 0


def build_parser():
  p = common.new_parser(PROG, __doc__)
  add_sampling_flags(p)
  p.add_argument("--image", required=True)
  p.add_argument("--mask", required=True, help="greyscale PNG of the image size: white = keep, black = generate")
  p.add_argument("--white-is-generate", action="store_true", help="invert the mask convention")
  p.add_argument("--class", dest="class_id", type=int, default=None, help="class id (default: unconditional)")
  p.add_argument("--out", default="edited.png")
  return p


def main(argv=None) -> int:
  argv = list(sys.argv if argv is None else argv)
  return cmd_edit(build_parser().parse_args(argv[1:]))

"""`var-jax convert`: the official .pth files -> a var-jax (Orbax) directory that
`var_jax.load_pretrained(DIR)` and `var-jax sample --model DIR` read without torch."""
from __future__ import annotations

import sys

from var_jax.cli import common

PROG = "var-jax convert"


def cmd_convert(args) -> int:
  from var_jax.inference.pretrained import convert_files, save_converted
  common.check_output_dir(args.out, "--out", remote_ok=False)
  model = convert_files(args.vae, args.var, patch_nums=args.patch_nums)
  out = save_converted(model, args.out)
  print(f"converted depth-{model.config.depth} VAR ({model.num_params():,} params) and its tokenizer "
        f"to {common.shown(out)}; load it with var_jax.load_pretrained('{common.shown(out)}')")
  return 0


def build_parser():
  p = common.new_parser(PROG, __doc__)
  p.add_argument("--vae", required=True, help="the official tokenizer file (vae_ch160v4096z32.pth)")
  p.add_argument("--var", required=True, help="the official VAR file (var_d16.pth, ...)")
  p.add_argument("--out", required=True, help="directory to write")
  p.add_argument("--patch-nums", type=common.int_list("--patch-nums", "1,2,3,4"), default=None,
                 help="scales (default: the released 256/512 px schedule the VAR fits)")
  return p


def main(argv=None) -> int:
  argv = list(sys.argv if argv is None else argv)
  return cmd_convert(build_parser().parse_args(argv[1:]))

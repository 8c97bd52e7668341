"""Builds the compiled CPU tile loops ahead of their first use: `python -m hf_tensor_attn.build [--rebuild]`.

The first CPU call of the tiled op does the same when no library is cached; this step lets an install, an image
build or a CI job pay the build's time (15 s to a minute) up front, and reports where the library is. It prints
`ops.extension.describe()` as JSON and exits 0 where the library loads, 1 where it cannot be built or loaded (the
warning above it says why; the op then runs its Python loops). Set TORCH_EXTENSIONS_DIR first to build into another
cache folder; `--rebuild` builds again even where a checked library is cached.
"""

from __future__ import annotations

import argparse
import json

from .ops import extension


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hf_tensor_attn.build", description=__doc__.splitlines()[0])
    parser.add_argument("--rebuild", action="store_true", help="build again even where a checked library is cached")
    args = parser.parse_args(argv)
    ops = extension.build(rebuild=args.rebuild)
    print(json.dumps(extension.describe(), indent=2))
    return 0 if ops is not None else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Command line: ``python -m models build minilm|minilm-ts|digits|smollm2|smollm2-kv``, ``list``.

``build`` prints the built model's path (building only when the cache is stale);
``list`` prints each recipe, its cache file and whether a current build is cached.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from models import digits_cnn, minilm, smollm2
from models.cache import cache_dir, is_current


@dataclass(frozen=True)
class Recipe:
    """A buildable model: CLI name, what it is, and how to build and locate it."""

    name: str
    summary: str
    build: Callable[[bool], Path]
    filename: Callable[[], str]
    version: Callable[[], str]


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(
            "minilm",
            "MiniLM-L6 encoder, dynamo export, opset 20 (fp32 baseline)",
            lambda force: minilm.build("dynamo", force=force),
            lambda: minilm.onnx_filename("dynamo"),
            lambda: minilm.recipe_version("dynamo"),
        ),
        Recipe(
            "minilm-ts",
            "MiniLM-L6 encoder, TorchScript export, opset 17",
            lambda force: minilm.build("torchscript", force=force),
            lambda: minilm.onnx_filename("torchscript"),
            lambda: minilm.recipe_version("torchscript"),
        ),
        Recipe(
            "digits",
            "small Conv+BN+ReLU CNN on sklearn digits, opset 17",
            lambda force: digits_cnn.build(force=force),
            digits_cnn.onnx_filename,
            digits_cnn.recipe_version,
        ),
        Recipe(
            "smollm2",
            "SmolLM2-135M-Instruct fp32 (GGUF Q4_1 dequantized), no KV cache, dynamo opset 20",
            lambda force: smollm2.build("no-cache", force=force),
            lambda: smollm2.onnx_filename("no-cache"),
            lambda: smollm2.recipe_version("no-cache"),
        ),
        Recipe(
            "smollm2-kv",
            "SmolLM2-135M-Instruct fp32 decoder with past/present KV cache, dynamo opset 20",
            lambda force: smollm2.build("kv-cache", force=force),
            lambda: smollm2.onnx_filename("kv-cache"),
            lambda: smollm2.recipe_version("kv-cache"),
        ),
    )
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m models", description=__doc__)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="-v info, -vv debug")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build a model into the cache and print its path")
    build.add_argument("recipe", choices=sorted(RECIPES))
    build.add_argument("--force", action="store_true", help="rebuild even if cached")
    sub.add_parser("list", help="list recipes and their cache state")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    args = _parser().parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "build":
        print(RECIPES[args.recipe].build(args.force))
        return 0
    folder = cache_dir()
    print(f"cache: {folder}")
    for recipe in RECIPES.values():
        path = folder / recipe.filename()
        state = "cached" if is_current(path, recipe.version()) else "not built"
        print(f"{recipe.name:<10} {state:<10} {path.name:<28} {recipe.summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

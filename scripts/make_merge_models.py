"""Build (or rebuild) a merge suite's pretrained and fine-tuned models into the polytask cache.

    python scripts/make_merge_models.py --suite digits-merge
    python scripts/make_merge_models.py --suite vision-merge --option subset=2000 --rebuild
    python scripts/make_merge_models.py --suite all

The library builds a suite lazily on first use too; this script does it ahead of time.
"""

from __future__ import annotations

import argparse
import json

import torch
import yaml

from polytask.merging.suites import load_merge_suite, suite_names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", required=True, help=f"one of {', '.join(suite_names())} or 'all'")
    parser.add_argument("--option", action="append", default=[], help="build option key=value (YAML value), repeatable")
    parser.add_argument("--rebuild", action="store_true", help="rebuild even if cached")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    options = {}
    for pair in args.option:
        key, _, value = pair.partition("=")
        options[key] = yaml.safe_load(value)
    for name in suite_names() if args.suite == "all" else [args.suite]:
        suite = load_merge_suite(name, rebuild=args.rebuild, **options)
        meta = suite.meta
        print(json.dumps({"suite": name, "directory": str(suite.directory), "build_seconds": meta["build_seconds"],
                          "merged_parameters": meta["merged_parameters"], "finetuned_accuracy": meta["finetuned_accuracy"],
                          "base_accuracy": meta["base_accuracy"]}, indent=2))


if __name__ == "__main__":
    main()

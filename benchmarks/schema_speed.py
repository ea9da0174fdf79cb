"""Schema-layer speed, side by side with what a megatron-based validator pays.

1. `bioconf validate example.json` in a fresh process vs `python -c "import megatron.core.transformer"`
   (the import alone, before any validation). Target: >= 30x faster.
2. In-process validation of a full config (every field present) vs constructing megatron's
   TransformerConfig with the same values. Target: >= 20,000 configs/s, and not slower.

    .venv/bin/python benchmarks/schema_speed.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import warnings
from pathlib import Path

import orjson
from _table import median_wall, print_table, rate

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "pretrain_esm2_small.json"


def fresh_process(repeats: int) -> None:
    # pip compiles an installed package's bytecode; an editable checkout under
    # PYTHONDONTWRITEBYTECODE would recompile bioconf on every start, so compile it once first.
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "bioconf")], check=True)
    bioconf = str(Path(sys.executable).with_name("bioconf"))
    ours = median_wall([bioconf, "validate", str(EXAMPLE)], repeats, cwd=str(ROOT))
    megatron = median_wall(
        [sys.executable, "-W", "ignore", "-c", "import megatron.core.transformer"], repeats
    )
    print_table(
        "Fresh process: validate one config (median wall seconds)",
        ["command", "seconds", "ratio"],
        [
            ["bioconf validate examples/pretrain_esm2_small.json", f"{ours:.3f}", "1.0x"],
            [
                'python -c "import megatron.core.transformer"',
                f"{megatron:.3f}",
                f"{megatron / ours:.1f}x slower",
            ],
        ],
    )


def in_process() -> None:
    from bioconf.schema import ModelConfig

    # A full config: every field present, as a pipeline that always sends everything would.
    user = orjson.loads(EXAMPLE.read_bytes())
    full = ModelConfig.model_validate(user).to_dict()
    full_json = orjson.dumps(full)
    ours_dict = rate(lambda: ModelConfig.model_validate(full))
    ours_json = rate(lambda: ModelConfig.model_validate(orjson.loads(full_json)))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.transformer.transformer_config import TransformerConfig

        from bioconf.runtime.values import to_megatron_kwargs

    kwargs = to_megatron_kwargs(
        ModelConfig.model_validate(user), only_megatron_fields=True, explicit_only=False
    )
    megatron = rate(lambda: TransformerConfig(**kwargs))
    print_table(
        f"In-process: validate a full config ({len(full)} fields)",
        ["what", "configs/s", "ratio vs megatron"],
        [
            ["ModelConfig.model_validate(dict)", f"{ours_dict:,.0f}", f"{ours_dict / megatron:.1f}x"],
            [
                "ModelConfig.model_validate(orjson.loads(bytes))",
                f"{ours_json:,.0f}",
                f"{ours_json / megatron:.1f}x",
            ],
            ["megatron TransformerConfig(**same values)", f"{megatron:,.0f}", "1.0x"],
        ],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    fresh_process(args.repeats)
    in_process()


if __name__ == "__main__":
    main()

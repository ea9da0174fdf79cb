"""Write examples/finetune.ipynb (the notebook walkthrough) from the cells below, without outputs.

    python tools/make_notebook.py

tests/test_notebook.py executes the notebook, so it never rots.
"""

import subprocess
import sys
from pathlib import Path

import nbformat

CELLS = [
    (
        "markdown",
        "# Fine-tuning from a checkpoint with bioconf\n\n"
        "Build a config in Python, see where every value comes from when it starts from a checkpoint, "
        "then build the Megatron model and load the checkpoint's weights. Runs on a CPU; nothing is "
        "downloaded: the first cell makes a small ESM-2-like checkpoint.",
    ),
    (
        "code",
        "import warnings\n\nwarnings.filterwarnings('ignore')  # megatron's notices about optional packages",
    ),
    (
        "code",
        "import tempfile\n"
        "from pathlib import Path\n\n"
        "from bioconf import demo\n"
        "from bioconf.resolve import resolve\n"
        "from bioconf.runtime import build_model, ensure_parallel_state, init_checkpoint, materialize\n"
        "from bioconf.schema import ModelConfig\n\n"
        "pretrained = Path(tempfile.mkdtemp()) / 'esm2-small'\n"
        "init_checkpoint(ModelConfig(**demo.PRETRAIN), pretrained)",
    ),
    ("markdown", "A fine-tune config: the architecture, more dropout, fp32, and a new output head."),
    (
        "code",
        "config = ModelConfig(\n"
        "    model_cls='bert', num_layers=6, hidden_size=320, num_attention_heads=20,\n"
        "    params_dtype='fp32', initial_ckpt_skip_keys_with_these_prefixes=['lm_head.'],\n"
        ").with_overrides('hidden_dropout=0.1', {'attention_dropout': 0.1})\n"
        "config",
    ),
    (
        "markdown",
        "Resolve it against the checkpoint: the values this config sets are kept (policy `explicit`), "
        "the rest comes from the checkpoint, and megatron derives the sizes left unset.",
    ),
    ("code", "resolved = resolve(config, pretrained)\nresolved"),
    ("markdown", "Materialize the Megatron config, build the model and load the weights, skipping the head."),
    (
        "code",
        "runtime = materialize(resolved.config)\n"
        "runtime.use_cpu_initialization = True\n"
        "with ensure_parallel_state(runtime):\n"
        "    model = build_model(runtime)\n"
        "    report = runtime.update_model_from_checkpoint(model, str(pretrained), quiet=True)\n"
        "print(report)\n"
        "assert set(report.skipped.values()) == {'lm_head.'}",
    ),
]


def main() -> None:
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    notebook.cells = [
        nbformat.v4.new_markdown_cell(text) if kind == "markdown" else nbformat.v4.new_code_cell(text)
        for kind, text in CELLS
    ]
    target = Path(__file__).resolve().parents[1] / "examples" / "finetune.ipynb"
    nbformat.write(notebook, target)
    # The cells are written in ruff's style so `make lint` passes on the notebook as generated.
    subprocess.run([str(Path(sys.executable).with_name("ruff")), "format", "-q", str(target)], check=True)
    print(f"wrote {target}")


if __name__ == "__main__":
    main()

